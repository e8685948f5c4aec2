"""The one model item: what inference, in-app training and offline training feed the model.

One slice (``(H, W)`` / ``(H, W, 3)`` uint8, 0..255, prepared as the predictor receives it) and
its structure mask become::

    {"image":    float32 (3, 256, 256): longest side resized to 256, normalised, then
                 zero-padded bottom/right (``medsegx.transforms.to_model_input``, the
                 predictor's own transform),
     "label":    float32 (1, 256, 256) {0, 1}, nearest-exact resized and padded alike,
     "box":      float32 (4,) XYXY in the 256 frame: the mask's inclusive pixel box mapped as
                 the predictor maps a user's box (``box_to_model``),
     "valid_hw": int64 (2,) rows and columns of the unpadded area,
     "context":  int64 (5,) (modality, level1, level2, level3, task)}

``item_from_arrays`` makes it for datastore slices (the app's train task, the benchmark) and
for MedSegDB cases (``medsegx.data.MedSegDBDataset``) alike. During training ``jitter_box``
pushes each box side out by a uniform random 0..19 px (``TRAIN_BOX_JITTER``, the paper's
recipe), or in an in-loop round by up to a tenth of the box's extent (``max_fraction``,
``medsegx.budget``); evaluation uses the exact box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medsegx.modeling.normalize import PixelNormalize, stretch_minmax  # re-exported: the item's normalisation
from medsegx.transforms import IMAGE_SIZE, ResizeInfo, box_to_model, to_model_input

__all__ = ["TRAIN_BOX_JITTER", "PixelNormalize", "item_from_arrays", "jitter_box", "mask_box", "mask_to_model",
           "side_extents", "stretch_minmax", "widen_box"]

# Paper recipe: each box side pushed out by a uniform random 0..19 px during training,
# i.e. torch.randint(0, TRAIN_BOX_JITTER).
TRAIN_BOX_JITTER = 20


def mask_to_model(mask: np.ndarray | torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """``(H, W)`` mask -> ``(1, 256, 256)`` float {0, 1} in the model frame.

    Nearest-exact resize to the valid area, zero padding bottom/right (the image's
    longest-side resize and padding, ``medsegx.transforms``).
    """
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    if tuple(tensor.shape) != info.original_size:
        raise ValueError(f"mask shape {tuple(tensor.shape)} != image (H, W) {info.original_size}")
    height, width = info.resized_size
    tensor = tensor[None, None]
    if (height, width) != info.original_size:
        tensor = F.interpolate(tensor, size=(height, width), mode="nearest-exact")
    tensor = F.pad(tensor, (0, IMAGE_SIZE - width, 0, IMAGE_SIZE - height))
    return tensor[0]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive pixel bounding box ``(x0, y0, x1, y1)`` of a non-empty ``(H, W)`` mask.

    Raises:
        ValueError: the mask is empty.
    """
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    cols = np.flatnonzero(np.asarray(mask).any(axis=0))
    if rows.size == 0:
        raise ValueError("the mask is empty: no box")
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def item_from_arrays(image: np.ndarray, mask: np.ndarray, context: Sequence[int],
                     normalize: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device | str | None = None, allow_empty: bool = False) -> dict[str, torch.Tensor]:
    """A prepared slice and its structure mask -> the tensors of one training item (exact box).

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8, as the predictor receives it.
        mask: ``(H, W)`` bool, non-empty.
        context: the 5 ConMoAE indices.
        normalize: ``model.normalize`` (the predictor's normalisation).
        device: where the image is resized and normalised (the model's device, as the
            predictor does); the other tensors stay on the CPU.
        allow_empty: an empty mask gets the whole valid area as its box instead of an error
            (MedSegDB readers that keep empty cases).

    Returns:
        ``{"image": (3, 256, 256) float normalised and padded, "label": (1, 256, 256) float,
        "box": (4,) float XYXY 256 frame, "valid_hw": (2,) long (rows, cols of the unpadded
        area), "scale": () float (model pixels per original pixel), "context": (5,) long}``.

    Raises:
        ValueError: the mask is empty or its size differs from the image's.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    tensor, info = to_model_input(image, normalize, device)
    if allow_empty and not np.asarray(mask).any():
        height, width = info.resized_size
        box = np.array([0.0, 0.0, width - 1.0, height - 1.0], dtype=np.float32)
    else:
        box = box_to_model(mask_box(mask), info)
    return {
        "image": tensor[0],
        "label": mask_to_model(mask, info),
        "box": torch.from_numpy(box),
        "valid_hw": torch.tensor(info.resized_size, dtype=torch.long),
        "scale": torch.tensor(info.scale, dtype=torch.float32),
        "context": torch.tensor(tuple(context), dtype=torch.long),
    }


def jitter_box(box: torch.Tensor, valid_hw: Sequence[int] | torch.Tensor, max_shift: int = TRAIN_BOX_JITTER,
               generator: torch.Generator | None = None, max_fraction: float = 0.0) -> torch.Tensor:
    """Push each side of a 256-frame box out by a uniform random ``0..bound-1`` px.

    The bound is ``max_shift`` for every side (paper: ``torch.randint(0, TRAIN_BOX_JITTER)``,
    0..19 px), or with ``max_fraction > 0`` a share of the box's own extent along that side's
    axis, ``round(max_fraction * (side + 1))``, at least 1 (an unmoved side) and at most
    ``max_shift`` (the in-loop recipe, ``medsegx.budget.INLOOP_BOX_JITTER_FRACTION``). The box
    is clipped to the valid (unpadded) area.

    Args:
        box: ``(4,)`` XYXY in the 256 frame.
        valid_hw: rows and columns of the unpadded area.
        max_shift: exclusive bound of the shift; 0 returns the box unchanged.
        generator: optional RNG (default: torch's global RNG, seeded per DataLoader worker).
        max_fraction: the bound as a share of the box side (0: ``max_shift`` for every side).
    """
    box = torch.as_tensor(box, dtype=torch.float32)
    if max_shift <= 0:
        return box.clone()
    if max_fraction > 0:
        bounds = torch.clamp(torch.round(max_fraction * side_extents(box)), 1.0, float(max_shift))
        shifts = torch.floor(torch.rand(4, generator=generator) * bounds)
    else:
        shifts = torch.randint(0, max_shift, (4,), generator=generator).float()
    return widen_box(box, shifts, valid_hw)


def side_extents(box: torch.Tensor) -> torch.Tensor:
    """``(4,)`` the extent in px of an inclusive XYXY box along each side's axis: (w, h, w, h)."""
    box = torch.as_tensor(box, dtype=torch.float32)
    return torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2) + 1.0


def widen_box(box: torch.Tensor, margins: torch.Tensor, valid_hw: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Push each side of an XYXY box out by ``margins`` (``(4,)`` px), clipped to the valid (unpadded) area."""
    widened = torch.as_tensor(box, dtype=torch.float32) + margins * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    height, width = (int(v) for v in valid_hw)
    upper = torch.tensor([width - 1.0, height - 1.0, width - 1.0, height - 1.0])
    return torch.minimum(widened.clamp_min(0.0), upper)
