"""Build the offline sample data for the MedSegX MONAI Label app.

Everything is generated locally, without network access, deterministically (fixed seeds)
and in a few seconds on two CPU cores:

* ``<out>/`` is a MONAI Label local datastore (images at the top level, labels in
  ``labels/final/<same file name>``):
  ``mni152_t1.nii.gz`` (the real MNI152 T1 brain template bundled with nilearn, labelled
  grey/white matter), ``ct_phantom.nii.gz`` (synthetic abdominal CT, labelled),
  ``ct_phantom_unlabelled.nii.gz`` (synthetic abdominal CT, no label: active-learning work)
  and ``ct_slice_2d.png`` (one axial phantom slice, windowed W400/L40, labelled).
* ``<out>/../datastore_gt/`` holds the ground truth of the images the datastore leaves
  unlabelled (for benchmarks), never read by MONAI Label.
* ``<out>/../dicom/ct_phantom_2/`` is a one-file-per-slice CT DICOM series (another
  phantom), because MONAI Label's local datastore only lists files, not series folders;
  ``<out>/../dicom/mni152_t1/`` is the MNI152 T1 template as an MR series (PACS tests need
  both modalities).

Usage::

    python sample-data/build_sample_data.py --out sample-data/datastore [--force]
        [--include-pydicom-testdata]

See ``sample-data/README.md`` for the provenance and licence of every sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Bump when the generated content changes, so an existing build is redone.
BUILDER_VERSION = 2
MANIFEST_NAME = "sample_data_manifest.json"

CT_LABELS: dict[str, int] = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5}
MNI152_LABELS: dict[str, int] = {"grey_matter": 1, "white_matter": 2}

CT_SHAPE = (192, 192, 48)  # (x, y, z) voxels
CT_SPACING = (1.5, 1.5, 3.0)  # mm
SEED_CT_LABELLED = 1
SEED_CT_DICOM = 2
SEED_CT_UNLABELLED = 3
SEED_CT_SLICE_2D = 4
SEED_MR_DICOM = 5  # UIDs of the MNI152 MR series (its voxels are the template's)
SLICE_2D_SIZE = 256
# The 2D slice covers the same 288 mm field of view as the 3D phantoms at 256 pixels.
SLICE_2D_SPACING = (CT_SPACING[0] * CT_SHAPE[0] / SLICE_2D_SIZE, CT_SPACING[1] * CT_SHAPE[1] / SLICE_2D_SIZE, 3.0)

# Tissue densities in Hounsfield units (portal-venous-phase-like contrast).
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 40.0,
    "bowel_gas": -900.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_cortex": 160.0,
    "kidney_medulla": 120.0,
    "aorta": 200.0,
    "bone": 700.0,
}
NOISE_SD_HU = 10.0
# Fixed dates keep the DICOM files byte-identical between builds.
DICOM_DATE = "20240101"
DICOM_TIME = "120000"
UID_NAMESPACE = "medsegx-sample-data"

MNI152_THRESHOLD = 0.5  # probability threshold for the grey/white matter labels
MNI152_BRAIN_THRESHOLD = 0.2  # nilearn's default for load_mni152_brain_mask
MNI152_RESOLUTION_MM = 2
MNI152_INTENSITY_MAX = 1000  # nilearn rescales the template to 0..1; stored as int16 0..1000

PYDICOM_TESTDATA = ("CT_small.dcm", "MR_small.dcm")


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Ellipsoid:
    """A 3D ellipsoid in patient millimetres (LPS: +x patient left, +y posterior, +z superior).

    Args:
        center_mm: centre ``(x, y, z)`` at ``z = center_mm[2]``.
        radii_mm: semi-axes ``(rx, ry, rz)`` before rotation; ``rz = inf`` makes an elliptic cylinder.
        angle_deg: in-plane rotation about the z axis.
        lean_xy: shift of the centre in x and y per millimetre of z, so organs lean and
            their cross-sections move from slice to slice.
    """

    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    angle_deg: float = 0.0
    lean_xy: tuple[float, float] = (0.0, 0.0)

    def scaled(self, factor: float) -> "Ellipsoid":
        """The same ellipsoid with every semi-axis multiplied by ``factor``."""
        return Ellipsoid(self.center_mm, tuple(r * factor for r in self.radii_mm), self.angle_deg, self.lean_xy)


def voxel_grid_mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Open (broadcastable) grids of voxel-centre coordinates in mm, centred on the volume.

    Returns:
        ``(x, y, z)`` arrays of shapes ``(X, 1, 1)``, ``(1, Y, 1)`` and ``(1, 1, Z)``; index 0
        along x is the patient's right (LPS +x points to the patient's left).
    """
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return np.ix_(*axes)


def ellipsoid_distance(grid: tuple[np.ndarray, ...], ellipsoid: Ellipsoid) -> np.ndarray:
    """Normalised distance to the centre of ``ellipsoid``: < 1 inside, 1 on the surface."""
    x, y, z = grid
    cx, cy, cz = ellipsoid.center_mm
    rx, ry, rz = ellipsoid.radii_mm
    dz = z - cz
    dx = x - (cx + ellipsoid.lean_xy[0] * dz)
    dy = y - (cy + ellipsoid.lean_xy[1] * dz)
    theta = np.deg2rad(ellipsoid.angle_deg)
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    squared = (u / rx) ** 2 + (v / ry) ** 2
    if np.isfinite(rz):
        squared = squared + (dz / rz) ** 2
    return np.sqrt(squared)


def _gaussian_interpolation_weights(n: int, n_knots: int) -> np.ndarray:
    """``(n, n_knots)`` row-normalised Gaussian weights from evenly spaced knots to ``n`` samples."""
    positions = np.arange(n, dtype=np.float32)
    knots = np.linspace(0.0, n - 1, n_knots, dtype=np.float32)
    width = max((n - 1) / max(n_knots - 1, 1), 1.0) * 0.6
    weights = np.exp(-0.5 * ((positions[:, None] - knots[None, :]) / width) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def smooth_noise_field(
    rng: np.random.Generator, shape: tuple[int, int, int], coarse: tuple[int, int, int] = (6, 6, 4)
) -> np.ndarray:
    """A smooth random field in [-1, 1]: coarse Gaussian noise interpolated with Gaussian kernels.

    Separable kernel interpolation costs a few milliseconds where ``ndimage.zoom`` takes
    ~0.4 s per 192 x 192 x 48 field.
    """
    coarse_noise = rng.standard_normal(coarse).astype(np.float32)
    wx, wy, wz = (_gaussian_interpolation_weights(n, c) for n, c in zip(shape, coarse))
    field = np.einsum("ia,jb,kc,abc->ijk", wx, wy, wz, coarse_noise, optimize=True)
    return np.clip(field / max(float(np.abs(field).max()), 1e-6), -1.0, 1.0).astype(np.float32)


def ellipsoid_mask(
    grid: tuple[np.ndarray, ...],
    ellipsoid: Ellipsoid,
    wobble: np.ndarray | None = None,
    wobble_amplitude: float = 0.0,
) -> np.ndarray:
    """Boolean mask of ``ellipsoid`` sampled on ``grid``.

    Args:
        grid: output of :func:`voxel_grid_mm`.
        ellipsoid: the shape.
        wobble: optional smooth field (see :func:`smooth_noise_field`) of the full volume shape
            that bumps the surface in and out, so the blob is not a perfect ellipsoid.
        wobble_amplitude: relative size of the bumps (0.1 = +-10 % of the radius).
    """
    distance = ellipsoid_distance(grid, ellipsoid)
    threshold = 1.0 if wobble is None else 1.0 + wobble_amplitude * wobble
    return distance < threshold


# --------------------------------------------------------------------------- CT phantom


def ct_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of a phantom stored as ``[x, y, z]`` with DICOM's axial orientation.

    The array axes follow the DICOM patient axes (LPS: column index -> patient left, row
    index -> posterior, slice index -> superior) and the volume is centred on the origin,
    which is what MONAI's ITK/pydicom readers return for the DICOM series written by
    :func:`write_ct_dicom_series` (they convert LPS to RAS by negating x and y).
    """
    origin_lps = np.array([-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine[:3, 3] = origin_lps * np.array([-1.0, -1.0, 1.0])
    return affine


def _jitter(rng: np.random.Generator, value: float, sd: float) -> float:
    return float(value + rng.normal(0.0, sd))


def make_ct_phantom(
    seed: int,
    shape: tuple[int, int, int] = CT_SHAPE,
    spacing: tuple[float, float, float] = CT_SPACING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic contrast-enhanced abdominal CT with its organ labels.

    Organs are smooth blobs (ellipsoids with a random bumpy surface) whose position, size
    and lean vary with ``seed``; all of them cross the middle slice. Anatomy is in patient
    coordinates: the liver is on the patient's right (low x index, shown on the image left
    in radiological convention), the spleen on the left, the spine posterior (high y index).

    Args:
        seed: random seed; the same seed gives the same volume, bit for bit.
        shape: ``(X, Y, Z)`` voxels.
        spacing: ``(sx, sy, sz)`` in mm.

    Returns:
        ``(hu, label, affine)``: ``hu`` int16 ``(X, Y, Z)`` Hounsfield units (air -1000, noise
        sd 10 HU); ``label`` uint8 ``(X, Y, Z)`` with :data:`CT_LABELS`; ``affine`` 4x4 RAS
        (see :func:`ct_affine`).
    """
    rng = np.random.default_rng(seed)
    grid = voxel_grid_mm(shape, spacing)
    coarse = (6, 6, max(1, min(4, shape[2])))

    def wobble() -> np.ndarray:
        return smooth_noise_field(rng, shape, coarse)

    body_scale = rng.uniform(0.93, 1.05)
    body = Ellipsoid((0.0, 5.0, 0.0), (132.0 * body_scale, 98.0 * body_scale, np.inf))
    body_mask = ellipsoid_mask(grid, body, wobble(), 0.03)
    fat_thickness = rng.uniform(10.0, 20.0)
    inner = Ellipsoid(body.center_mm, (body.radii_mm[0] - fat_thickness, body.radii_mm[1] - fat_thickness, np.inf))
    inner_mask = ellipsoid_mask(grid, inner, wobble(), 0.04) & body_mask

    hu = np.full(shape, HU["air"], dtype=np.float32)
    hu[body_mask] = HU["fat"]
    hu[inner_mask] = HU["muscle"]
    label = np.zeros(shape, dtype=np.uint8)

    def paint(mask: np.ndarray, value_hu: float, label_value: int | None = None) -> None:
        mask = mask & inner_mask
        hu[mask] = value_hu
        if label_value is not None:
            label[mask] = label_value

    # Intra-abdominal fat between the organs and a few bowel-gas pockets (unlabelled).
    mesentery = Ellipsoid(
        (_jitter(rng, 15.0, 5.0), _jitter(rng, -40.0, 3.0), _jitter(rng, 0.0, 10.0)),
        (rng.uniform(28.0, 40.0), rng.uniform(16.0, 22.0), 70.0),
        angle_deg=_jitter(rng, 0.0, 15.0),
    )
    paint(ellipsoid_mask(grid, mesentery, wobble(), 0.25), HU["fat"])

    liver = Ellipsoid(
        (_jitter(rng, -52.0, 4.0), _jitter(rng, -2.0, 4.0), _jitter(rng, 30.0, 5.0)),
        (62.0 * rng.uniform(0.92, 1.08), 58.0 * rng.uniform(0.92, 1.08), 80.0),
        angle_deg=_jitter(rng, -15.0, 5.0),
        lean_xy=(_jitter(rng, 0.25, 0.05), _jitter(rng, -0.1, 0.05)),
    )
    paint(ellipsoid_mask(grid, liver, wobble(), 0.10), HU["liver"], CT_LABELS["liver"])

    spleen = Ellipsoid(
        (_jitter(rng, 82.0, 3.0), _jitter(rng, 30.0, 4.0), _jitter(rng, 25.0, 5.0)),
        (20.0 * rng.uniform(0.9, 1.1), 40.0 * rng.uniform(0.9, 1.1), 45.0),
        angle_deg=_jitter(rng, 35.0, 6.0),
        lean_xy=(_jitter(rng, -0.1, 0.05), _jitter(rng, -0.15, 0.05)),
    )
    paint(ellipsoid_mask(grid, spleen, wobble(), 0.10), HU["spleen"], CT_LABELS["spleen"])

    # The right kidney sits a little lower than the left one (the liver pushes it down).
    for side, x_sign, z_centre in (("kidney_left", 1.0, -8.0), ("kidney_right", -1.0, -16.0)):
        kidney = Ellipsoid(
            (x_sign * _jitter(rng, 52.0, 3.0), _jitter(rng, 52.0, 3.0), _jitter(rng, z_centre, 4.0)),
            (20.0 * rng.uniform(0.9, 1.1), 27.0 * rng.uniform(0.9, 1.1), 38.0),
            angle_deg=x_sign * _jitter(rng, -30.0, 5.0),
            lean_xy=(x_sign * 0.08, 0.0),
        )
        kidney_wobble = wobble()
        paint(ellipsoid_mask(grid, kidney, kidney_wobble, 0.06), HU["kidney_cortex"], CT_LABELS[side])
        paint(ellipsoid_mask(grid, kidney.scaled(0.6), kidney_wobble, 0.06), HU["kidney_medulla"], CT_LABELS[side])

    for _ in range(3):
        gas = Ellipsoid(
            (rng.uniform(-15.0, 40.0), rng.uniform(-58.0, -30.0), rng.uniform(-40.0, 40.0)),
            (rng.uniform(6.0, 12.0), rng.uniform(5.0, 9.0), rng.uniform(8.0, 20.0)),
        )
        paint(ellipsoid_mask(grid, gas) & (label == 0), HU["bowel_gas"])

    aorta = Ellipsoid(
        (_jitter(rng, 12.0, 2.0), _jitter(rng, 26.0, 2.0), 0.0),
        (11.0 * rng.uniform(0.9, 1.1), 11.0 * rng.uniform(0.9, 1.1), np.inf),
        lean_xy=(_jitter(rng, 0.0, 0.04), _jitter(rng, -0.05, 0.03)),
    )
    paint(ellipsoid_mask(grid, aorta), HU["aorta"], CT_LABELS["aorta"])

    # Vertebra: body plus spinous process; bone is not a labelled class.
    vertebral_body = Ellipsoid((0.0, _jitter(rng, 56.0, 2.0), 0.0), (19.0, 16.0, np.inf))
    spinous_process = Ellipsoid((0.0, vertebral_body.center_mm[1] + 32.0, 0.0), (6.0, 14.0, np.inf))
    bone = ellipsoid_mask(grid, vertebral_body) | ellipsoid_mask(grid, spinous_process)
    hu[bone & inner_mask] = HU["bone"]
    label[bone] = 0

    # Partial-volume blur (wider in-plane than across the thick slices), then scanner noise.
    sigma_voxels = (0.8, 0.8, 0.4 if shape[2] > 1 else 0.0)
    hu = ndimage.gaussian_filter(hu, sigma=sigma_voxels, mode="nearest")
    hu += rng.normal(0.0, NOISE_SD_HU, size=shape).astype(np.float32)
    hu_int16 = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return hu_int16, label, ct_affine(shape, spacing)


def window_to_uint8(hu: np.ndarray, width: float = 400.0, level: float = 40.0) -> np.ndarray:
    """Map Hounsfield units to 0..255 with a display window (default soft tissue W400/L40)."""
    low = level - width / 2.0
    scaled = (hu.astype(np.float32) - low) / width * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writers


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _uid(*parts: object) -> str:
    """A deterministic DICOM UID (pydicom root prefix) derived from ``parts``."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[UID_NAMESPACE, *[str(part) for part in parts]])


def write_ct_dicom_series(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    out_dir: Path,
    seed: int,
    patient_id: str,
    series_description: str,
) -> list[Path]:
    """Write an ``[x, y, z]`` int16 HU volume as one CT DICOM file per axial slice.

    Orientation: ``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]`` (columns run to the patient's
    left, rows to posterior), slice ``k`` at z = the ``k``-th z coordinate of :func:`ct_affine`,
    so readers rebuild exactly the NIfTI written from the same array. Pixels are stored
    unsigned (HU + 1024) with ``RescaleIntercept = -1024``, ``RescaleSlope = 1``.

    Works with pydicom 2.4 and 3.x.

    Returns:
        The written file paths, ordered by slice index.
    """
    origin_lps = tuple(-(n - 1) / 2.0 * s for n, s in zip(hu.shape, spacing))
    stored = (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    tags = {
        "Modality": "CT",
        "Manufacturer": "MedSegX synthetic phantom",
        "PatientName": f"Phantom^{patient_id}",
        "BodyPartExamined": "ABDOMEN",
        "KVP": 120,
        "RescaleIntercept": -1024,
        "RescaleSlope": 1,
        "RescaleType": "HU",
        "WindowCenter": 40,
        "WindowWidth": 400,
    }
    return _write_axial_series(stored, spacing, origin_lps, out_dir, seed, patient_id, series_description, tags)


def write_mr_dicom_series(
    intensity: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: Path,
    seed: int,
    patient_id: str,
    series_description: str,
) -> list[Path]:
    """Write an axial ``[x, y, z]`` int16 MR volume (diagonal RAS affine) as one MR DICOM file per slice.

    DICOM's axial layout has columns running to the patient's left and rows to posterior, so a
    volume stored RAS (index x to the right, y to anterior) is flipped along x and y first;
    readers then return it with the affine ``diag(-sx, -sy, sz)`` and the same world positions.

    Returns:
        The written file paths, ordered by slice index.

    Raises:
        ValueError: ``affine_ras`` is not diagonal with positive spacings (not axial RAS).
    """
    spacing = np.diag(affine_ras)[:3]
    if not np.allclose(affine_ras[:3, :3], np.diag(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"expected a diagonal RAS affine with positive spacings, got\n{affine_ras}")
    flipped = intensity[::-1, ::-1, :]
    first_voxel_ras = affine_ras @ np.array([intensity.shape[0] - 1, intensity.shape[1] - 1, 0, 1.0])
    origin_lps = (-first_voxel_ras[0], -first_voxel_ras[1], first_voxel_ras[2])
    stored = flipped.astype(np.int32).clip(0, 4095).astype(np.uint16)
    tags = {
        "Modality": "MR",
        "Manufacturer": "MNI ICBM152 2009a template (nilearn)",
        "PatientName": f"Template^{patient_id}",
        "BodyPartExamined": "HEAD",
        "MagneticFieldStrength": 3,
        "ScanningSequence": "GR",
        "SequenceVariant": "NONE",
        "MRAcquisitionType": "3D",
        "WindowCenter": int(stored.max()) // 2,
        "WindowWidth": int(stored.max()),
    }
    return _write_axial_series(
        stored, tuple(float(s) for s in spacing), origin_lps, out_dir, seed, patient_id, series_description, tags
    )


def _write_axial_series(
    stored: np.ndarray,
    spacing: tuple[float, float, float],
    origin_lps: tuple[float, float, float],
    out_dir: Path,
    seed: int,
    patient_id: str,
    series_description: str,
    modality_tags: dict[str, Any],
) -> list[Path]:
    """One file per axial slice of ``stored`` (uint16 ``[x, y, z]``, 12 bits), UIDs derived from ``seed``."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID

    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}[modality_tags["Modality"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    pydicom_major = int(pydicom.__version__.split(".")[0])
    n_cols, n_rows, n_slices = stored.shape
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series")
    frame_uid = _uid(seed, "frame-of-reference")

    paths = []
    for slice_index in range(n_slices):
        sop_uid = _uid(seed, "instance", slice_index)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"slice_{slice_index:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientID = patient_id
        ds.PatientSex = "O"
        ds.PatientBirthDate = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = DICOM_DATE
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = DICOM_TIME
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = slice_index + 1
        ds.StudyDescription = "MedSegX sample data"
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        for keyword, value in modality_tags.items():
            setattr(ds, keyword, value)

        z_mm = origin_lps[2] + slice_index * spacing[2]
        ds.ImagePositionPatient = [f"{origin_lps[0]:.4f}", f"{origin_lps[1]:.4f}", f"{z_mm:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z_mm:.4f}"
        ds.SliceThickness = spacing[2]
        ds.SpacingBetweenSlices = spacing[2]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (row spacing, column spacing)

        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_rows
        ds.Columns = n_cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        # DICOM pixel rows are image rows (y), so the [x, y] slice is transposed.
        ds.PixelData = np.ascontiguousarray(stored[:, :, slice_index].T).tobytes()

        if pydicom_major >= 3:
            ds.save_as(path, enforce_file_format=True)
        else:  # pydicom 2.x encodes from these dataset attributes
            ds.is_little_endian = True
            ds.is_implicit_VR = False
            ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- samples


def mni152_intensity(template) -> np.ndarray:
    """The nilearn MNI152 template (0..1) as int16 0..``MNI152_INTENSITY_MAX``, in its own ``(X, Y, Z)`` layout."""
    return np.round(np.clip(np.asarray(template.dataobj, dtype=np.float32), 0.0, 1.0)
                    * MNI152_INTENSITY_MAX).astype(np.int16)


def _build_mni152(out_dir: Path, labels_dir: Path, extra_dir: Path, series_dir: Path, gt_dir: Path) -> dict[str, Path]:
    """Write the MNI152 T1 template, its grey/white-matter label, its brain mask and its MR DICOM series."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    # These loaders read the copies inside the nilearn package: no download happens.
    t1 = load_mni152_template(resolution=MNI152_RESOLUTION_MM)
    grey = np.asarray(load_mni152_gm_template(resolution=MNI152_RESOLUTION_MM).dataobj, dtype=np.float32)
    white = np.asarray(load_mni152_wm_template(resolution=MNI152_RESOLUTION_MM).dataobj, dtype=np.float32)
    brain = np.asarray(
        load_mni152_brain_mask(resolution=MNI152_RESOLUTION_MM, threshold=MNI152_BRAIN_THRESHOLD).dataobj
    )
    affine = t1.affine

    intensity = mni152_intensity(t1)

    # The probability maps overlap a little at the boundary: the more likely tissue wins.
    tissue = np.zeros(intensity.shape, dtype=np.uint8)
    tissue[(grey > MNI152_THRESHOLD) & (grey >= white)] = MNI152_LABELS["grey_matter"]
    tissue[(white > MNI152_THRESHOLD) & (white > grey)] = MNI152_LABELS["white_matter"]

    paths = {
        "image": out_dir / "mni152_t1.nii.gz",
        "label": labels_dir / "mni152_t1.nii.gz",
        "brain_mask": extra_dir / "mni152_t1_brain_mask.nii.gz",
        "label_map": out_dir / "mni152_t1_labels.json",
        "series": series_dir,
        "series_label": gt_dir / "mni152_t1_dicom.nii.gz",
    }
    _save_nifti(intensity, affine, paths["image"])
    _save_nifti(tissue, affine, paths["label"])
    _save_nifti((brain > 0).astype(np.uint8), affine, paths["brain_mask"])
    paths["label_map"].write_text(json.dumps(MNI152_LABELS, indent=2) + "\n")

    # The same template as an MR series (an MR study for DICOMweb/PACS tests), stored in DICOM's
    # axial layout (x and y flipped); its label in that layout is ground truth beside the datastore.
    write_mr_dicom_series(intensity, affine, series_dir, SEED_MR_DICOM, "MEDSEGX-MNI152", "MNI152 T1 template")
    flipped_affine = affine @ _flip_xy(intensity.shape)
    _save_nifti(np.ascontiguousarray(tissue[::-1, ::-1, :]), flipped_affine, paths["series_label"])
    return paths


def _flip_xy(shape: tuple[int, ...]) -> np.ndarray:
    """Index transform of ``array[::-1, ::-1, :]``: new index -> old index (4x4, homogeneous)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return flip


def _build_ct_slice_2d(out_dir: Path, labels_dir: Path) -> dict[str, Path]:
    """One 256 x 256 axial phantom slice as 8-bit grey PNG (W400/L40) and its label PNG."""
    from PIL import Image

    hu, label, _ = make_ct_phantom(SEED_CT_SLICE_2D, (SLICE_2D_SIZE, SLICE_2D_SIZE, 1), SLICE_2D_SPACING)
    # PNG rows are image rows (y): transpose the [x, y] slice.
    grey = window_to_uint8(hu[:, :, 0]).T
    paths = {"image": out_dir / "ct_slice_2d.png", "label": labels_dir / "ct_slice_2d.png"}
    Image.fromarray(np.ascontiguousarray(grey)).save(paths["image"])
    Image.fromarray(np.ascontiguousarray(label[:, :, 0].T)).save(paths["label"])
    return paths


def _copy_pydicom_testdata(target_dir: Path) -> dict[str, Path]:
    from pydicom.data import get_testdata_file

    target_dir.mkdir(parents=True, exist_ok=True)
    copied = {}
    for name in PYDICOM_TESTDATA:
        source = get_testdata_file(name)
        if source is None:
            raise FileNotFoundError(f"pydicom does not bundle {name}; is pydicom installed with its test files?")
        destination = target_dir / name
        shutil.copyfile(source, destination)
        copied[name] = destination
    return copied


_PATH_GROUPS = (
    "images",
    "labels",
    "extra_labels",
    "ground_truth",
    "dicom_series",
    "label_map_files",
    "pydicom_testdata",
)
_PATH_FIELDS = ("datastore", "ground_truth_dir", "dicom_dir")


def _paths_of(result: dict[str, Any]) -> list[str]:
    return [path for group in _PATH_GROUPS for path in result.get(group, {}).values()]


def build(
    out_dir: str | Path,
    force: bool = False,
    include_pydicom_testdata: bool = False,
    gt_dir: str | Path | None = None,
    dicom_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build the sample datastore and its side folders; skip when an up-to-date build exists.

    Args:
        out_dir: the MONAI Label datastore folder to create (images at the top level,
            labels in ``labels/final``).
        force: rebuild even if ``out_dir`` already holds a build of this builder version.
        include_pydicom_testdata: also copy pydicom's ``CT_small.dcm`` / ``MR_small.dcm`` to
            ``<dicom_dir>/pydicom_testdata/``.
        gt_dir: where the ground truth of unlabelled images goes; default ``<out_dir>/../datastore_gt``.
        dicom_dir: where DICOM series go; default ``<out_dir>/../dicom``.

    Returns:
        A dict with absolute paths (strings): ``datastore``, ``ground_truth_dir``, ``dicom_dir``,
        ``images``, ``labels``, ``extra_labels``, ``ground_truth``, ``dicom_series``,
        ``label_map_files`` and (if asked) ``pydicom_testdata``, each ``{sample name: path}``;
        ``label_maps`` (``{"ct_phantom": CT_LABELS, "mni152_t1": MNI152_LABELS}``), ``seeds``
        and ``built`` (False when an existing build was reused).
    """
    out_dir = Path(out_dir).resolve()
    gt_dir = Path(gt_dir).resolve() if gt_dir else out_dir.parent / "datastore_gt"
    dicom_dir = Path(dicom_dir).resolve() if dicom_dir else out_dir.parent / "dicom"

    result = None if force else _existing_build(out_dir, gt_dir, dicom_dir)
    if result is not None:
        logger.info("Sample data already built in %s (use --force to rebuild)", out_dir)
    else:
        result = _build_samples(out_dir, gt_dir, dicom_dir)
    if include_pydicom_testdata and not result.get("pydicom_testdata"):
        copied = _copy_pydicom_testdata(dicom_dir / "pydicom_testdata")
        result["pydicom_testdata"] = {name: str(path) for name, path in copied.items()}
        _write_manifest(out_dir / MANIFEST_NAME, result, out_dir.parent)
    return result


def _existing_build(out_dir: Path, gt_dir: Path, dicom_dir: Path) -> dict[str, Any] | None:
    """The result of an earlier build of this builder version with the same layout, if complete."""
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("builder_version") != BUILDER_VERSION:
        return None
    result = _resolve_manifest(manifest, out_dir.parent)
    if (result["ground_truth_dir"], result["dicom_dir"]) != (str(gt_dir), str(dicom_dir)):
        return None
    if not all(Path(path).exists() for path in _paths_of(result)):
        return None
    result["built"] = False
    return result


def _build_samples(out_dir: Path, gt_dir: Path, dicom_dir: Path) -> dict[str, Any]:
    labels_dir = out_dir / "labels" / "final"
    extra_dir = out_dir / "labels_extra"
    series_dir = dicom_dir / "ct_phantom_2"
    mr_series_dir = dicom_dir / "mni152_t1"
    for folder in (out_dir, labels_dir, extra_dir, gt_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (series_dir, mr_series_dir):
        if folder.exists():  # a rebuild must not leave slices of an older, longer series behind
            shutil.rmtree(folder)

    logger.info("Building MNI152 T1 sample")
    mni = _build_mni152(out_dir, labels_dir, extra_dir, mr_series_dir, gt_dir)

    logger.info("Building CT phantoms")
    label_map_path = out_dir / "ct_phantom_labels.json"
    label_map_path.write_text(json.dumps(CT_LABELS, indent=2) + "\n")

    hu, label, affine = make_ct_phantom(SEED_CT_LABELLED)
    _save_nifti(hu, affine, out_dir / "ct_phantom.nii.gz")
    _save_nifti(label, affine, labels_dir / "ct_phantom.nii.gz")

    hu, label, affine = make_ct_phantom(SEED_CT_UNLABELLED)
    _save_nifti(hu, affine, out_dir / "ct_phantom_unlabelled.nii.gz")
    _save_nifti(label, affine, gt_dir / "ct_phantom_unlabelled.nii.gz")

    hu, label, affine = make_ct_phantom(SEED_CT_DICOM)
    write_ct_dicom_series(hu, CT_SPACING, series_dir, SEED_CT_DICOM, "MEDSEGX-PHANTOM-2", "Synthetic abdomen phantom 2")
    _save_nifti(label, affine, gt_dir / "ct_phantom_2.nii.gz")

    logger.info("Building 2D sample")
    slice_2d = _build_ct_slice_2d(out_dir, labels_dir)

    result: dict[str, Any] = {
        "datastore": str(out_dir),
        "ground_truth_dir": str(gt_dir),
        "dicom_dir": str(dicom_dir),
        "images": {
            "mni152_t1": str(mni["image"]),
            "ct_phantom": str(out_dir / "ct_phantom.nii.gz"),
            "ct_phantom_unlabelled": str(out_dir / "ct_phantom_unlabelled.nii.gz"),
            "ct_slice_2d": str(slice_2d["image"]),
        },
        "labels": {
            "mni152_t1": str(mni["label"]),
            "ct_phantom": str(labels_dir / "ct_phantom.nii.gz"),
            "ct_slice_2d": str(slice_2d["label"]),
        },
        "extra_labels": {"mni152_t1_brain_mask": str(mni["brain_mask"])},
        "ground_truth": {
            "ct_phantom_unlabelled": str(gt_dir / "ct_phantom_unlabelled.nii.gz"),
            "ct_phantom_2": str(gt_dir / "ct_phantom_2.nii.gz"),
            "mni152_t1_dicom": str(mni["series_label"]),
        },
        "dicom_series": {"ct_phantom_2": str(series_dir), "mni152_t1": str(mr_series_dir)},
        "label_map_files": {"ct_phantom": str(label_map_path), "mni152_t1": str(mni["label_map"])},
        "label_maps": {"ct_phantom": dict(CT_LABELS), "mni152_t1": dict(MNI152_LABELS)},
        "seeds": {
            "ct_phantom": SEED_CT_LABELLED,
            "ct_phantom_2": SEED_CT_DICOM,
            "ct_phantom_unlabelled": SEED_CT_UNLABELLED,
            "ct_slice_2d": SEED_CT_SLICE_2D,
            "mni152_t1_dicom": SEED_MR_DICOM,
        },
    }
    _write_manifest(out_dir / MANIFEST_NAME, result, out_dir.parent)
    result["built"] = True
    return result


def _write_manifest(manifest_path: Path, result: dict[str, Any], root: Path) -> None:
    """Store the result with paths relative to the datastore's parent, so the tree can move."""

    def relative(path: str) -> str:
        return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path

    manifest = {key: value for key, value in result.items() if key != "built"}
    for field in _PATH_FIELDS:
        manifest[field] = relative(manifest[field])
    for group in _PATH_GROUPS:
        if group in manifest:
            manifest[group] = {name: relative(path) for name, path in manifest[group].items()}
    manifest["builder_version"] = BUILDER_VERSION
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _resolve_manifest(manifest: dict[str, Any], root: Path) -> dict[str, Any]:
    result = {key: value for key, value in manifest.items() if key != "builder_version"}
    for field in _PATH_FIELDS:
        result[field] = str((root / result[field]).resolve())
    for group in _PATH_GROUPS:
        if group in result:
            result[group] = {name: str((root / path).resolve()) for name, path in result[group].items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="datastore folder to create, e.g. sample-data/datastore"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument(
        "--include-pydicom-testdata",
        action="store_true",
        help="also copy pydicom's CT_small.dcm and MR_small.dcm to <dicom-dir>/pydicom_testdata/",
    )
    parser.add_argument(
        "--gt-dir", type=Path, default=None, help="ground-truth folder (default: <out>/../datastore_gt)"
    )
    parser.add_argument("--dicom-dir", type=Path, default=None, help="DICOM folder (default: <out>/../dicom)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    result = build(args.out, args.force, args.include_pydicom_testdata, args.gt_dir, args.dicom_dir)
    print(json.dumps({key: value for key, value in result.items() if key not in ("label_maps", "seeds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
