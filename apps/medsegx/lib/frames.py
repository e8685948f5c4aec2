"""Array plumbing between MONAI's loaded image and the predictor's frames.

MONAI's ``LoadImage`` returns a volume as ``(X, Y, Z)`` = ``(i, j, k)`` and a picture
(PNG/JPEG) as ``(X, Y)`` or ``(X, Y, C)`` (PIL's width first). The predictor takes
``(H, W)`` = ``(Y, X)`` slices and ``(Z, H, W)`` stacks (``docs/ARCHITECTURE.md``), and both
sides call a box ``(x0, y0, x1, y1)`` with the same x and y, so only axes move here, never
coordinates.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsegx.taxonomy import TaskContext
from medsegx.transforms import CT_MODALITIES, ct_window_name, prepare_intensity, prepare_volume

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_picture(image_path: str | None) -> bool:
    """A 2D picture file (display values 0..255), as opposed to a volume or a DICOM series."""
    return bool(image_path) and Path(image_path).suffix.lower() in PICTURE_SUFFIXES


def picture_to_rgb(array_xy: np.ndarray) -> np.ndarray:
    """``(X, Y)`` / ``(X, Y, C)`` picture -> ``(H, W, 3)`` uint8 with its display values kept.

    A picture is already windowed for display, so no intensity window is applied whatever
    the modality (a CT window on 0..255 values would blank it); alpha is dropped.
    """
    array = np.asarray(array_xy)
    if array.ndim == 3:
        array = array[..., :3] if array.shape[-1] >= 3 else array[..., 0]
    image_hw = np.swapaxes(array, 0, 1)
    if image_hw.ndim == 2:
        image_hw = np.repeat(image_hw[..., None], 3, axis=-1)
    return prepare_intensity(image_hw, "Endos")  # an RGB modality: keeps 0..255, rescales others


def loaded_volume_xyz(array: np.ndarray) -> np.ndarray:
    """A volume (not a picture) as MONAI's ``LoadImage`` returns it -> ``(X, Y, Z)``.

    A trailing channel of size 1 is dropped and a 2D NIfTI / DICOM frame becomes a one-slice
    volume (``Z = 1``); the infer task and the labelled-slice reader both clean up this way.

    Raises:
        ValueError: the array is not 3D after that.
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume or a 2D picture, the image has shape {array.shape}")
    return array


def volume_to_zhw(volume_xyz: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(Z, Y, X)`` view."""
    return np.transpose(volume_xyz, (2, 1, 0))


def mask_zhw_to_xyz(mask_zhw: np.ndarray) -> np.ndarray:
    return np.transpose(mask_zhw, (2, 1, 0))


def intensity_signature(modality: str, context: TaskContext) -> str:
    """What the intensity preparation depends on: the CT window, or the percentile rule."""
    return f"{modality}:{ct_window_name(context)}" if modality in CT_MODALITIES else f"{modality}:percentile"


class _LRU:
    """A thread-safe least-recently-used map of at most ``capacity`` items (0: keeps nothing)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def replace(self, key: Hashable, change: Callable[[Any], Any]) -> None:
        """``value = change(value)`` for a kept ``key`` (its place in the order is left as it is)."""
        with self._lock:
            if key in self._items:
                self._items[key] = change(self._items[key])


class PreparedVolumes:
    """A small LRU of volumes prepared to uint8 ``(Z, H, W)`` for the predictor.

    The same prepared pixels serve 2D requests (one slice) and 3D requests, so an embedding
    cached by one is valid for the other, and the intensity mapping of a volume is computed
    once over all voxels (``prepare_volume``), not per slice.

    Args:
        capacity: volumes kept (a 512 x 512 x 300 CT is 75 MiB prepared).
    """

    def __init__(self, capacity: int = 2):
        self._items = _LRU(capacity)

    def get(self, key: Hashable, volume_xyz: np.ndarray | Callable[[], np.ndarray], modality: str,
            context: TaskContext) -> tuple[np.ndarray, bool]:
        """Prepared ``(Z, H, W)`` uint8 for ``key``; (array, hit).

        On a miss it is built from ``volume_xyz``: the ``(X, Y, Z)`` volume, or a function that
        returns it (called only then: the infer task reads a file again whose pixels it let go).
        """
        prepared = self._items.get(key)
        if prepared is not None:
            return prepared, True
        volume = volume_xyz() if callable(volume_xyz) else volume_xyz
        prepared = prepare_volume(volume_to_zhw(volume), modality, context, channels=1)
        self._items.put(key, prepared)
        return prepared, False

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


def file_stamp(path: str) -> tuple | None:
    """``(path, mtime_ns, size)`` of a file, or of every file of a folder (a DICOM series); ``None`` if unreadable."""
    try:
        target = Path(path)
        if target.is_dir():
            entries = sorted((entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                             for entry in target.iterdir() if entry.is_file())
            return (str(target), tuple(entries))
        stat = target.stat()
        return (str(target), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None


@dataclass(frozen=True)
class ReleasedVolume:
    """A loaded volume whose pixels were let go once prepared (``PreparedVolumes``): what the
    infer task still needs of it, and no pixels (``LoadedImages.release_pixels``).

    Attributes:
        shape: the loaded image's shape (MONAI's ``(X, Y, Z)``, a 2D frame's ``(X, Y)`` ...).
        volume_shape: ``(X, Y, Z)`` as ``loaded_volume_xyz`` makes it.
        affine: the loaded image's affine (``MetaTensor.affine``), or ``None``.
        intensity_range: the voxels' ``(min, max)``: what modality detection reads.
    """

    shape: tuple[int, ...]
    volume_shape: tuple[int, int, int]
    affine: Any
    intensity_range: tuple[float, float]

    def __array__(self, *args, **kwargs):
        raise TypeError("the pixels of this volume were released; read the file again (MedSegXInfer)")


class LoadedImages:
    """The images the last requests loaded (MONAI's ``LoadImaged`` output), by file stamp.

    Reading a volume is most of a 2D request once its slice is encoded: a 512 x 512 x 160 CT
    ``.nii.gz`` takes ~1 s to decompress on this 2-core machine, the box 0.1 s
    (``bench/server_infer.py``). Keyed by ``file_stamp``, so a rewritten file is read again.
    The cached arrays are shared by requests and never written to. Once a volume is prepared
    the infer task keeps only its ``ReleasedVolume`` here (``release_pixels``): requests are
    served from the prepared volume (``PreparedVolumes``), and the file is read again only for
    another intensity preparation (a CT window or modality not prepared yet).

    Args:
        capacity: images kept (a 512 x 512 x 300 int16 CT is 150 MiB until it is prepared).
    """

    def __init__(self, capacity: int = 1):
        self._items = _LRU(capacity)

    def get(self, stamp: tuple | None) -> dict | None:
        loaded = self._items.get(stamp) if stamp is not None else None
        return dict(loaded) if loaded is not None else None

    def put(self, stamp: tuple | None, loaded: dict) -> None:
        if stamp is not None:
            self._items.put(stamp, dict(loaded))

    def release_pixels(self, stamp: tuple | None, released: ReleasedVolume) -> None:
        """Keep ``released`` instead of the pixels of the image loaded under ``stamp`` (if still kept)."""
        if stamp is not None:
            self._items.replace(stamp, lambda loaded: {**loaded, "image": released})
