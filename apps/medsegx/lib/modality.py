"""Which MedSegDB modality an image is: the request says, else DICOM says, else the intensities.

Order of precedence:

1. ``params["modality"]`` (any name or alias :func:`medsegx.taxonomy.resolve_modality` knows,
   DICOM tags included: ``"MR"`` -> ``"MRI"``);
2. the DICOM ``Modality`` (0008,0060) tag of a ``.dcm`` file or of the first file of a series
   folder (MONAI's readers do not keep that tag in the image meta data, so it is read with
   pydicom); for a NIfTI converted from a series, the series folder beside it: MONAI Label's
   DICOMweb datastore caches a PACS series as ``<cache>/<SeriesInstanceUID>/*.dcm`` and its
   conversion as ``<cache>/<SeriesInstanceUID>.nii.gz`` (``lib/dicomweb.py`` hands the task that
   cached file), so a CT series from the PACS is prepared as CT, an MR series as MR;
3. the intensities: a volume with ``min < -500`` and ``max > 500`` holds Hounsfield units and
   is ``CT``; anything else is taken for ``MRI``. 2D pictures (PNG/JPEG) hold display values
   0..255, so they come out as ``MRI``: send ``modality`` for a windowed CT slice, an X-ray,
   an endoscopy frame ...
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsegx.taxonomy import resolve_modality

logger = logging.getLogger(__name__)

CT_MIN_BELOW = -500.0
CT_MAX_ABOVE = 500.0


@dataclass(frozen=True)
class ModalityChoice:
    """A canonical MedSegDB modality and where it came from (``params`` | ``dicom`` | ``intensity``)."""

    modality: str
    source: str


#: Extensions of a volume converted from a DICOM series (MONAI Label's DICOMweb cache).
CONVERTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def source_series_folder(image_path: str | os.PathLike) -> Path | None:
    """The DICOM series folder a converted volume came from: ``<dir>/<id>/`` beside ``<dir>/<id>.nii.gz``."""
    path = Path(image_path)
    for suffix in CONVERTED_SUFFIXES:
        if path.name.endswith(suffix):
            folder = path.with_name(path.name[: -len(suffix)])
            return folder if folder.is_dir() else None
    return None


def dicom_modality_tag(image_path: str | os.PathLike) -> str | None:
    """The (0008,0060) Modality of a DICOM file or series folder (or of a converted volume's series), or ``None``."""
    path = Path(image_path)
    path = source_series_folder(path) or path
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file() and path.suffix.lower() in (".dcm", ".dicom", ""):
        candidates = [path]
    else:
        return None
    import pydicom

    for candidate in candidates[:8]:  # a series folder may hold a DICOMDIR or stray files first
        try:
            dataset = pydicom.dcmread(candidate, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # not DICOM; pydicom raises several types
            continue
        tag = str(dataset.get("Modality", "")).strip()
        if tag:
            return tag
    return None


def intensity_range(array: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of the values: all that :func:`detect_from_intensities` reads."""
    return float(np.min(array)), float(np.max(array))


def detect_from_intensities(array: np.ndarray | tuple[float, float]) -> str:
    """``CT`` when the values (or their ``(min, max)``) span Hounsfield air and bone, else ``MRI``."""
    low, high = array if isinstance(array, tuple) else intensity_range(array)
    return "CT" if low < CT_MIN_BELOW and high > CT_MAX_ABOVE else "MRI"


def choose_modality(requested: str | None, image_path: str | None,
                    array: np.ndarray | tuple[float, float]) -> ModalityChoice:
    """Apply the precedence above; ``array``: the image, or its ``intensity_range``.

    Raises:
        ValueError: ``requested`` is not a modality name (the message lists the accepted ones).
    """
    if requested:
        return ModalityChoice(resolve_modality(str(requested)), "params")
    tag = dicom_modality_tag(image_path) if image_path else None
    if tag:
        try:
            return ModalityChoice(resolve_modality(tag), "dicom")
        except ValueError:
            logger.warning("DICOM Modality %r has no MedSegDB modality; detecting from intensities", tag)
    return ModalityChoice(detect_from_intensities(array), "intensity")
