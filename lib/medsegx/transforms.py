"""Intensity preparation and the image / box / mask mapping to the 256 x 256 model frame.

Two frames meet here (see ``docs/ARCHITECTURE.md``):

- the **original frame**: image arrays indexed ``[row, col]`` = ``[y, x]``; boxes are
  ``(x0, y0, x1, y1)`` **inclusive pixel indices**, as a viewer sends them: the box covers
  columns ``x0..x1`` and rows ``y0..y1`` (a one-pixel box has ``x0 == x1``);
- the **model frame**: the image resized so that its longest side is 256, then zero-padded
  bottom/right to 256 x 256. A pixel index ``p`` maps to ``p * scale`` (SAM's
  ``ResizeLongestSide.apply_coords`` and the MedSegDB reader's box convention), so the model
  frame's boxes are XYXY floats with the same meaning.

Intensity preparation follows the MedSAM convention (spec "Intensity preparation"):

- CT / CBCT / CTA: a HU window chosen from the target's place in the MedSegDB tree
  (soft tissue W400/L40 by default, lung W1500/L-160, brain W80/L40, bone W1800/L400);
- MR, US, X-ray and other grey-scale: clip to the 0.5th..99.5th percentile of the non-zero
  voxels; voxels that were exactly 0 stay 0 (background outside the field of view);
- RGB (endoscopy, dermoscopy, fundus, colonoscopy, or any ``H x W x 3`` input): kept as
  0..255, min-max rescaled only if the values leave that range;
- grey-scale results are repeated to 3 channels.

The same ``to_model_input`` turns a prepared ``H x W x 3`` uint8 image into the model's
input tensor for inference and training (one transform factory, no copied literals).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medsegx.modeling.model import IMAGE_SIZE
from medsegx.taxonomy import TaskContext, resolve, resolve_modality

logger = logging.getLogger(__name__)

__all__ = [
    "CT_MODALITIES",
    "CT_WINDOWS",
    "IMAGE_SIZE",
    "PERCENTILE_RANGE",
    "RGB_MODALITIES",
    "ResizeInfo",
    "box_from_model",
    "box_to_model",
    "ct_window_name",
    "input_transform",
    "intensity_bounds",
    "logits_from_model",
    "mask_from_model",
    "normalize_and_pad",
    "points_to_model",
    "prepare_intensity",
    "prepare_volume",
    "resize_info",
    "resize_longest_side",
    "to_model_input",
    "validate_box",
    "validate_box3d",
    "validate_points",
]

#: HU windows as (width, level), MedSAM's presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -160.0),
    "brain": (80.0, 40.0),
    "bone": (1800.0, 400.0),
}
CT_MODALITIES = frozenset({"CT", "CBCT", "CTA"})
RGB_MODALITIES = frozenset({"Endos", "Dermos", "Fundus", "Colonos"})
#: Percentiles of the non-zero voxels that bound grey-scale (MR, US, X-ray ...) intensities.
PERCENTILE_RANGE = (0.5, 99.5)

# MedSegDB level-3 organs imaged in the lung / brain window; every level-1 "skeleton" target
# (bones, spine, joints) uses the bone window. Everything else: soft tissue.
_LUNG_ORGANS = frozenset({"lung", "trachea"})
_BRAIN_ORGANS = frozenset({"brain", "hippocampus", "pituitary"})
_BONE_ORGANS = frozenset(
    {"jawbone", "cervicalspine", "thoracicspine", "lumbarspine", "collarbone", "sacrum", "hip", "femur", "tibia"}
)

WindowSpec = str | tuple[float, float] | None


# ----------------------------------------------------------------------------- intensity


def ct_window_name(context: TaskContext | None) -> str:
    """The CT window preset for a target, from its place in the MedSegDB tree.

    Args:
        context: resolved target (``medsegx.taxonomy.resolve``); ``None`` = soft tissue.

    Returns:
        A key of ``CT_WINDOWS``: ``"bone"`` for level-1 ``skeleton`` (or a bone organ),
        ``"lung"`` for organs ``lung`` / ``trachea``, ``"brain"`` for ``brain`` /
        ``hippocampus`` / ``pituitary``, else ``"soft_tissue"``.
    """
    if context is None:
        return "soft_tissue"
    if context.body_part == "skeleton" or context.organ in _BONE_ORGANS:
        return "bone"
    if context.organ in _LUNG_ORGANS:
        return "lung"
    if context.organ in _BRAIN_ORGANS:
        return "brain"
    return "soft_tissue"


def _context_for(target: str | TaskContext | None, modality: str) -> TaskContext | None:
    if target is None or isinstance(target, TaskContext):
        return target
    return resolve(str(target), modality)


def _is_rgb(array: np.ndarray, volume: bool) -> bool:
    return array.ndim == (4 if volume else 3) and array.shape[-1] == 3


def intensity_bounds(
    array: np.ndarray,
    modality: str,
    target: str | TaskContext | None = None,
    window: WindowSpec = None,
) -> tuple[float, float]:
    """Intensity range ``(low, high)`` that maps to 0..255 for a grey-scale image or volume.

    Args:
        array: raw grey values of any shape (a slice or a whole volume: compute once per
            volume so that all slices share one mapping).
        modality: any name ``resolve_modality`` accepts ("CT", "MR", "US", ...).
        target: target name or ``TaskContext``; picks the CT window.
        window: override for CT: a ``CT_WINDOWS`` key or ``(width, level)`` in HU. For other
            modalities a ``(width, level)`` also overrides the percentiles.

    Raises:
        ValueError: unknown modality or window preset.
    """
    canonical = resolve_modality(modality)
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown window {window!r}; expected one of {', '.join(CT_WINDOWS)} or (width, level)")
        width, level = CT_WINDOWS[window]
    elif window is not None:
        width, level = (float(v) for v in window)
        if not width > 0:
            raise ValueError(f"window width must be > 0, got {window!r}")
    elif canonical in CT_MODALITIES:
        width, level = CT_WINDOWS[ct_window_name(_context_for(target, canonical))]
    else:
        values = array[array != 0]
        if values.size == 0:
            return 0.0, 1.0
        low, high = np.percentile(values, PERCENTILE_RANGE)
        return float(low), float(high)
    return level - width / 2.0, level + width / 2.0


def _rescale(array: np.ndarray, low: float, high: float, keep_zero: bool) -> np.ndarray:
    """Clip to [low, high], map linearly to 0..255 uint8; ``keep_zero``: raw 0 stays 0."""
    values = array.astype(np.float32, copy=False)
    span = max(high - low, 1e-6)
    out = np.clip((values - low) * (255.0 / span), 0.0, 255.0)
    if keep_zero:
        out[values == 0] = 0.0
    return np.rint(out).astype(np.uint8)


def _rgb_to_uint8(array: np.ndarray) -> np.ndarray:
    """Keep 0..255 (uint8 or in range); min-max to 0..255 otherwise (e.g. 0..1 floats, 16 bit)."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and 1.0 < high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return np.rint((values - low) * (255.0 / max(high - low, 1e-6))).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def prepare_intensity(
    array: np.ndarray,
    modality: str,
    target: str | TaskContext | None = None,
    window: WindowSpec = None,
) -> np.ndarray:
    """Raw 2D image -> ``H x W x 3`` uint8 in 0..255 (MedSAM convention, see module doc).

    Args:
        array: ``(H, W)`` grey values (HU for CT) or ``(H, W, 3)`` RGB.
        modality: "CT", "MR", "US", "Xray", "Endos", ... (any ``resolve_modality`` alias).
        target: target name or ``TaskContext``: picks the CT window.
        window: optional override, see ``intensity_bounds``.

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        ValueError: wrong shape, unknown modality or window.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if _is_rgb(array, volume=False):
        resolve_modality(modality)  # still validate the name
        return _rgb_to_uint8(array)
    if array.ndim != 2:
        raise ValueError(f"image must be (H, W) grey or (H, W, 3) RGB, got shape {array.shape}; "
                         "use prepare_volume for a (Z, H, W) volume")
    return _grey_to_rgb(_prepare_grey(array, modality, target, window))


def _prepare_grey(array, modality, target, window) -> np.ndarray:
    canonical = resolve_modality(modality)
    if canonical in RGB_MODALITIES and window is None:
        return _rgb_to_uint8(array)  # a grey fundus/endoscopy frame: same 0..255 rule
    low, high = intensity_bounds(array, canonical, target, window)
    keep_zero = canonical not in CT_MODALITIES and window is None
    return _rescale(array, low, high, keep_zero)


def prepare_volume(
    volume: np.ndarray,
    modality: str,
    target: str | TaskContext | None = None,
    window: WindowSpec = None,
    channels: int = 3,
) -> np.ndarray:
    """Raw ``(Z, H, W)`` volume -> uint8 slices with one intensity mapping for the whole volume.

    The window / percentiles are computed once over all voxels, so neighbouring slices are
    consistent (per-slice percentiles would change contrast along z). Slices are rescaled one
    at a time to bound the float memory.

    Args:
        volume: ``(Z, H, W)`` grey values, or ``(Z, H, W, 3)`` RGB frames.
        modality, target, window: as in ``prepare_intensity``.
        channels: 3 -> ``(Z, H, W, 3)``; 1 -> ``(Z, H, W)`` (a third of the memory; the
            predictor accepts both).

    Returns:
        uint8 ``(Z, H, W, 3)`` or ``(Z, H, W)``.

    Raises:
        ValueError: wrong shape, ``channels`` not 1 or 3, unknown modality or window.
    """
    volume = np.asarray(volume)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if _is_rgb(volume, volume=True):
        resolve_modality(modality)
        rgb = _rgb_to_uint8(volume)
        return rgb if channels == 3 else rgb[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"volume must be (Z, H, W) or (Z, H, W, 3), got shape {volume.shape}")
    canonical = resolve_modality(modality)
    if canonical in RGB_MODALITIES and window is None:
        grey = _rgb_to_uint8(volume)
    else:
        low, high = intensity_bounds(volume, canonical, target, window)
        keep_zero = canonical not in CT_MODALITIES and window is None
        grey = np.empty(volume.shape, dtype=np.uint8)
        for z in range(volume.shape[0]):
            grey[z] = _rescale(volume[z], low, high, keep_zero)
    return _grey_to_rgb(grey) if channels == 3 else grey


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ResizeInfo:
    """How an original image sits in the 256 x 256 model frame.

    Attributes:
        original_size: ``(H, W)`` of the original image.
        scale: model pixels per original pixel (``256 / max(H, W)``).
        resized_size: ``(h, w)`` of the valid (unpadded) area, ``round(H * scale)`` etc.
    """

    original_size: tuple[int, int]
    scale: float
    resized_size: tuple[int, int]


def resize_info(height: int, width: int, image_size: int = IMAGE_SIZE) -> ResizeInfo:
    """Longest-side geometry for an ``(height, width)`` image (same rounding as ``medsegx.data``)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got (H, W) = ({height}, {width})")
    scale = image_size / max(height, width)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    return ResizeInfo((int(height), int(width)), scale, resized)


def resize_longest_side(images: torch.Tensor, image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, ResizeInfo]:
    """Resize ``(B, C, H, W)`` float images so that the longest side is ``image_size``.

    Bilinear with antialiasing (as ``medsegx.data``), clamped to 0..255. No padding.
    """
    height, width = images.shape[-2:]
    info = resize_info(height, width, image_size)
    if info.resized_size != (height, width):
        images = F.interpolate(images, size=info.resized_size, mode="bilinear", align_corners=False,
                               antialias=info.scale < 1.0).clamp_(0.0, 255.0)
    return images, info


def normalize_and_pad(
    images: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    image_size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Normalise resized ``(B, 3, h, w)`` 0..255 images, then zero-pad bottom/right to 256.

    The padding is 0 *after* normalisation (the backbone input convention of the spec).
    """
    height, width = images.shape[-2:]
    if height > image_size or width > image_size:
        raise ValueError(f"images must be at most {image_size} x {image_size} after resizing, got {height} x {width}")
    return F.pad(normalize(images), (0, image_size - width, 0, image_size - height))


def to_model_input(
    image: np.ndarray | torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ResizeInfo]:
    """The one image -> model-input transform shared by inference and training.

    Args:
        image: prepared ``(H, W, 3)`` uint8 (``prepare_intensity``), or a float tensor
            ``(3, H, W)`` in 0..255.
        normalize: ``model.normalize``.
        device: where the tensor goes (resizing runs there).

    Returns:
        ``(1, 3, 256, 256)`` normalised, zero-padded float tensor and its ``ResizeInfo``.

    Raises:
        ValueError: not ``(H, W, 3)`` / ``(3, H, W)``.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        tensor = image.float()[None]
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"image must be (H, W, 3) uint8, got shape {array.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()
    if device is not None:
        tensor = tensor.to(device)
    resized, info = resize_longest_side(tensor)
    return normalize_and_pad(resized, normalize), info


def input_transform(model) -> Callable[[np.ndarray | torch.Tensor], tuple[torch.Tensor, ResizeInfo]]:
    """``image -> (input tensor, ResizeInfo)`` bound to a model's normalisation and device."""
    device = next(model.parameters()).device

    def transform(image):
        return to_model_input(image, model.normalize, device)

    return transform


def validate_box(box_xyxy: Sequence[float] | np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Check an inclusive pixel box against an image and clip it to the image.

    Args:
        box_xyxy: ``(x0, y0, x1, y1)``, inclusive pixel indices (x = column, y = row).
        image_size: ``(H, W)``.

    Returns:
        float64 ``(4,)`` box clipped to ``[0, W - 1] x [0, H - 1]``.

    Raises:
        ValueError: not 4 finite numbers, ``x1 < x0`` or ``y1 < y0``, or no overlap with the
            image; the message names the box and the image size.
    """
    height, width = image_size
    box = np.asarray(box_xyxy, dtype=np.float64).reshape(-1)
    where = f"box {tuple(np.asarray(box_xyxy).reshape(-1).tolist())} (x0, y0, x1, y1) on an image of W x H = {width} x {height}"
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise ValueError(f"{where}: a box must be 4 finite numbers x0 y0 x1 y1")
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{where}: inverted, need x0 <= x1 and y0 <= y1")
    if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
        raise ValueError(f"{where}: entirely outside the image (valid x 0..{width - 1}, y 0..{height - 1})")
    clipped = np.clip(box, 0.0, [width - 1, height - 1, width - 1, height - 1])
    if not np.array_equal(clipped, box):
        logger.debug("%s clipped to %s", where, clipped.tolist())
    return clipped


def validate_box3d(box3d: Sequence[float] | np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, int, int]:
    """Check a 3D box ``(x0, y0, x1, y1, z0, z1)`` (inclusive indices) against a ``(Z, H, W)`` volume.

    Returns:
        The clipped 2D box (float64 ``(4,)``) and the clipped integer slice range ``z0, z1``.

    Raises:
        ValueError: not 6 finite numbers, inverted, or entirely outside; names box and size.
    """
    depth, height, width = shape
    values = np.asarray(box3d, dtype=np.float64).reshape(-1)
    where = f"box3d {tuple(np.asarray(box3d).reshape(-1).tolist())} (x0, y0, x1, y1, z0, z1) on a volume of " \
            f"W x H x Z = {width} x {height} x {depth}"
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise ValueError(f"{where}: need 6 finite numbers x0 y0 x1 y1 z0 z1")
    z_first, z_last = values[4], values[5]
    if z_last < z_first:
        raise ValueError(f"{where}: inverted, need z0 <= z1")
    if z_last < 0 or z_first > depth - 1:
        raise ValueError(f"{where}: z range entirely outside the volume (valid z 0..{depth - 1})")
    try:
        box_xy = validate_box(values[:4], (height, width))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return box_xy, int(np.ceil(max(z_first, 0))), int(np.floor(min(z_last, depth - 1)))


def validate_points(
    points: Sequence[Sequence[float]] | np.ndarray | None, image_size: tuple[int, int] | None = None
) -> np.ndarray | None:
    """``(N, 3)`` rows ``(x, y, label)`` (label 1 foreground, 0 background) -> float64 array; None if empty.

    Args:
        points: original-frame pixel points with labels.
        image_size: ``(H, W)``: also check that every point lies on the image.

    Raises:
        ValueError: wrong shape, non-finite values, a label other than 0 / 1, or a point
            outside the image.
    """
    if points is None:
        return None
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return None
    if array.ndim != 2 or array.shape[1] != 3 or not np.all(np.isfinite(array)):
        raise ValueError(f"points must be (N, 3) rows (x, y, label), got shape {array.shape}")
    if not np.all(np.isin(array[:, 2], (0, 1))):
        raise ValueError(f"point labels must be 1 (foreground) or 0 (background), got {sorted(set(array[:, 2].tolist()))}")
    if image_size is not None:
        points_to_model(array[:, :2], resize_info(*image_size))  # raises for a point off the image
    return array


def content_key(image: np.ndarray) -> str:
    """Hash of an array's pixels, shape and dtype: the cache key of an image without a name
    (``Predictor``'s embedding cache, ``medsegx.steps.EncoderMemo``)."""
    # SHA-1 (not a security boundary: an in-memory cache key): the CPU's SHA extension hashes a
    # 512 x 512 x 3 slice in ~0.4 ms, BLAKE2b took ~0.85 ms of a ~22 ms cache hit
    digest = hashlib.sha1(np.ascontiguousarray(image).data)
    digest.update(repr((image.shape, image.dtype.str)).encode())
    return digest.hexdigest()


def box_to_model(box_xyxy: Sequence[float] | np.ndarray, info: ResizeInfo) -> np.ndarray:
    """Original-frame inclusive pixel box -> XYXY float32 ``(4,)`` in the 256 model frame.

    The box is validated and clipped first (``validate_box``).
    """
    return (validate_box(box_xyxy, info.original_size) * info.scale).astype(np.float32)


def box_from_model(box_256: Sequence[float] | np.ndarray, info: ResizeInfo) -> np.ndarray:
    """XYXY box in the 256 model frame -> original-frame pixel coordinates (float64, not rounded)."""
    return np.asarray(box_256, dtype=np.float64).reshape(4) / info.scale


def points_to_model(points_xy: Sequence[Sequence[float]] | np.ndarray, info: ResizeInfo) -> np.ndarray:
    """``(N, 2)`` original-frame ``(x, y)`` pixel points -> float32 ``(N, 2)`` in the model frame.

    Raises:
        ValueError: not ``(N, 2)`` finite, or a point outside the image.
    """
    height, width = info.original_size
    points = np.asarray(points_xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or not np.all(np.isfinite(points)):
        raise ValueError(f"points must be (N, 2) finite (x, y) pixels, got shape {points.shape}")
    outside = (points[:, 0] < 0) | (points[:, 0] > width - 1) | (points[:, 1] < 0) | (points[:, 1] > height - 1)
    if outside.any():
        raise ValueError(f"point {tuple(points[outside][0].tolist())} (x, y) is outside the image of "
                         f"W x H = {width} x {height}")
    return (points * info.scale).astype(np.float32)


def logits_from_model(logits_256: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Crop the valid area of ``(..., 256, 256)`` logits and resize bilinearly to ``(..., H, W)``."""
    height, width = info.resized_size
    valid = logits_256[..., :height, :width]
    lead = valid.shape[:-2]
    flat = valid.reshape(-1, 1, height, width).float()
    if (height, width) != info.original_size:
        flat = F.interpolate(flat, size=info.original_size, mode="bilinear", align_corners=False)
    return flat.reshape(*lead, *info.original_size)


def mask_from_model(logits_256: torch.Tensor | np.ndarray, info: ResizeInfo) -> np.ndarray:
    """``(..., 256, 256)`` model-frame logits -> ``(..., H, W)`` bool mask (logit > 0, i.e. sigmoid > 0.5).

    The mask of thresholding ``logits_from_model`` (bilinear, ``align_corners=False``), computed in
    NumPy as ``rows @ logits @ cols.T`` (``_bilinear_weights``) on the block that the positive
    logits reach: an output pixel mixes at most 2 x 2 logits with non-negative weights, so one
    whose logits are all <= 0 is background. On a request after an OpenVINO call this took
    0.4-2.4 ms where PyTorch's threaded ``interpolate`` and compare took ~18 ms (its OpenMP
    threads wait for cores the runtime's threads still hold).
    """
    if isinstance(logits_256, torch.Tensor):
        logits_256 = logits_256.detach().float().cpu().numpy()
    height, width = info.resized_size
    valid = np.asarray(logits_256, dtype=np.float32)[..., :height, :width]
    lead = valid.shape[:-2]
    if (height, width) == info.original_size:
        return valid > 0
    rows, cols = _bilinear_weights(info.original_size[0], height), _bilinear_weights(info.original_size[1], width)
    planes = valid.reshape(-1, height, width)
    masks = np.zeros((planes.shape[0], *info.original_size), dtype=bool)
    for plane, mask in zip(planes, masks):
        positive = plane > 0
        if not positive.any():
            continue
        ys, xs = np.flatnonzero(positive.any(axis=1)), np.flatnonzero(positive.any(axis=0))
        (r0, r1), (y0, y1) = _reach(rows, ys[0], ys[-1])
        (c0, c1), (x0, x1) = _reach(cols, xs[0], xs[-1])
        block = rows[r0:r1, y0:y1] @ plane[y0:y1, x0:x1] @ cols[c0:c1, x0:x1].T
        mask[r0:r1, c0:c1] = block > 0
    return masks.reshape(*lead, *info.original_size)


def _reach(weights: np.ndarray, first: int, last: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Output span (half-open) whose interpolation touches inputs ``first..last``, and the input
    span (half-open) those outputs read: one input more on each side."""
    touched = np.flatnonzero(weights[:, first:last + 1].any(axis=1))
    return (int(touched[0]), int(touched[-1]) + 1), (max(0, first - 1), min(weights.shape[1], last + 2))


@functools.lru_cache(maxsize=8)
def _bilinear_weights(size_out: int, size_in: int) -> np.ndarray:
    """``(size_out, size_in)`` float32 weights of PyTorch's 1D linear resize, ``align_corners=False``
    (source ``(i + 0.5) * size_in / size_out - 0.5``, clamped at 0; the upper neighbour clamped
    at the edge), with no antialiasing: what ``F.interpolate(mode="bilinear")`` applies per axis."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    fraction = (source - lower).astype(np.float32)
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    np.add.at(weights, (np.arange(size_out), lower), 1.0 - fraction)
    np.add.at(weights, (np.arange(size_out), upper), fraction)
    weights.flags.writeable = False
    return weights
