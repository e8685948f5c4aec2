"""A volume converted from a DICOM series keeps the series' modality (``lib/modality.py``).

MONAI Label's DICOMweb datastore caches a PACS series as ``<cache>/<uid>/*.dcm`` beside its
conversion ``<cache>/<uid>.nii.gz``; the task is handed the NIfTI (``lib/dicomweb.py``).
"""

import shutil

import numpy as np
import pytest

from lib.modality import choose_modality, source_series_folder

HU_LIKE = np.array([[-1000.0, 0.0], [40.0, 1200.0]])  # intensities that would read as CT
MRI_LIKE = np.array([[0.0, 100.0], [400.0, 900.0]])  # ... and as MRI


@pytest.mark.parametrize("series, intensities, expected", [("ct_phantom_2", MRI_LIKE, "CT"),
                                                           ("mni152_t1", HU_LIKE, "MRI")])
def test_converted_volume_reads_the_modality_of_its_cached_series(sample_data, tmp_path, series, intensities,
                                                                  expected):
    uid = "1.2.826.0.1.3680043.8.498.1"
    shutil.copytree(sample_data["dicom_series"][series], tmp_path / uid)
    converted = tmp_path / f"{uid}.nii.gz"
    converted.write_bytes(b"")  # only its name matters here

    assert source_series_folder(converted) == tmp_path / uid
    choice = choose_modality(None, str(converted), intensities)
    assert (choice.modality, choice.source) == (expected, "dicom")


def test_a_volume_without_a_series_beside_it_falls_back_to_intensities(tmp_path):
    converted = tmp_path / "ct.nii.gz"
    converted.write_bytes(b"")
    assert source_series_folder(converted) is None
    assert choose_modality(None, str(converted), HU_LIKE).source == "intensity"
