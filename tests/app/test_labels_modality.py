"""The app's label map and the modality precedence (params > DICOM > intensities)."""

import numpy as np
import pytest
from lib.labels import DEFAULT_LABELS, SAMPLE_STRUCTURES, LabelMap
from lib.modality import choose_modality, detect_from_intensities

from medsegx.taxonomy import resolve


def test_label_map_is_a_short_list_and_appends_new_names(tmp_path):
    labels = LabelMap(tmp_path)
    assert list(labels.labels) == list(DEFAULT_LABELS) and len(DEFAULT_LABELS) <= 30
    assert list(DEFAULT_LABELS[: len(SAMPLE_STRUCTURES)]) == list(SAMPLE_STRUCTURES)
    assert list(labels.labels.values()) == list(range(1, len(DEFAULT_LABELS) + 1))
    assert all(resolve(name, "CT").task is not None for name in DEFAULT_LABELS)  # each names a MedSegDB task
    value, added = labels.value_of("renal cyst")
    assert added and value == len(DEFAULT_LABELS) + 1
    assert labels.value_of("renal cyst") == (value, False)
    assert LabelMap(tmp_path).labels["renal cyst"] == value  # stable across restarts


def test_label_map_from_a_site_list(tmp_path):
    labels = LabelMap(tmp_path, ("hippocampus", "amygdala"))
    assert labels.labels == {"hippocampus": 1, "amygdala": 2}


def test_modality_precedence(tmp_path):
    hu = np.array([-1000.0, 40.0, 900.0])
    assert choose_modality("MR", None, hu).modality == "MRI"
    assert choose_modality(None, None, hu) == choose_modality(None, str(tmp_path / "x.nii.gz"), hu)
    assert choose_modality(None, None, hu).source == "intensity"
    assert detect_from_intensities(hu) == "CT"
    assert detect_from_intensities(np.array([0.0, 255.0])) == "MRI"
    with pytest.raises(ValueError):
        choose_modality("XYZ", None, hu)


def test_modality_from_dicom_header(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    assert pydicom.dcmread(path).Modality == "MR"
    choice = choose_modality(None, path, np.zeros(3))
    assert (choice.modality, choice.source) == ("MRI", "dicom")
