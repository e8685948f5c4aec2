"""Helpers of the PACS tests: Orthanc queries and a DICOM-SEG decoder independent of the app's."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import requests


def click_on(label_path: str, value: int) -> list[int]:
    """A voxel near the centre of the largest cross-section of ``value`` ([i, j, k])."""
    label = np.asarray(nib.load(label_path).dataobj) == value
    k = int(np.argmax(label.sum(axis=(0, 1))))
    i, j = np.nonzero(label[..., k])
    centre = np.array([np.median(i), np.median(j)])
    nearest = np.argmin((i - centre[0]) ** 2 + (j - centre[1]) ** 2)
    return [int(i[nearest]), int(j[nearest]), k]


def orthanc_instances(orthanc) -> set[str]:
    return set(requests.get(f"{orthanc.url}/instances", timeout=30).json())


def seg_series(orthanc) -> list[dict]:
    return requests.get(f"{orthanc.dicomweb}/series", params={"Modality": "SEG"}, timeout=30).json()


def fetch_seg(orthanc, study_uid: str, series_uid: str):
    """The one instance of a DICOM-SEG series, through DICOMweb (WADO-RS)."""
    from dicomweb_client import DICOMwebClient

    instances = DICOMwebClient(orthanc.dicomweb).retrieve_series(study_uid, series_uid)
    assert len(instances) == 1
    return instances[0]


def seg_on_grid(dataset, reference: nib.Nifti1Image) -> np.ndarray:
    """Decode a SEG with pydicom-seg and place its frames on ``reference``'s voxel grid.

    The SEG holds only the slices with a segment; its geometry (spacing, direction, origin
    in LPS) must put them exactly on voxels of the reference, which is asserted.
    """
    import pydicom_seg

    decoded = pydicom_seg.MultiClassReader().read(dataset).image  # SimpleITK, LPS
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(reference.affine[:3, :3], axis=0)
    direction_lps = ras_to_lps @ reference.affine[:3, :3] / spacing
    np.testing.assert_allclose(decoded.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(np.reshape(decoded.GetDirection(), (3, 3)), direction_lps, atol=1e-6)
    origin_ras = ras_to_lps @ np.asarray(decoded.GetOrigin())
    offset = np.linalg.solve(reference.affine[:3, :3], origin_ras - reference.affine[:3, 3])
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-3)  # on the lattice
    offset = np.round(offset).astype(int)

    import SimpleITK as sitk

    frames = np.transpose(sitk.GetArrayFromImage(decoded), (2, 1, 0))  # (z, y, x) -> (x, y, z)
    placed = np.zeros(reference.shape, dtype=np.uint8)
    end = offset + frames.shape
    assert np.all(offset >= 0) and np.all(end <= reference.shape), (offset, frames.shape, reference.shape)
    placed[offset[0]:end[0], offset[1]:end[1], offset[2]:end[2]] = frames
    return placed
