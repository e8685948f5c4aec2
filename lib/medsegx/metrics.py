"""Segmentation metrics: Dice (DSC), HD95 and normalised surface Dice (NSD).

The numpy functions take one binary mask pair, 2D ``(H, W)`` or 3D ``(D, H, W)`` (any axis
order, as long as ``spacing`` follows it), and return a Python ``float``. They follow
the MedSegX evaluation protocol: per image on the 256 x 256 grid, prediction =
``sigmoid(logits) > 0.5``, NSD at a 2 px tolerance.

Surfaces are the mask voxels that touch the background under face connectivity
(``mask & ~binary_erosion(mask)``, voxels on the array border count as surface), and the
distances are Euclidean distances between surface voxels (``scipy.ndimage`` distance
transforms, honouring ``spacing``), as in MONAI's ``compute_hausdorff_distance`` and
``compute_surface_dice``.

Empty masks never produce ``nan`` or ``inf``:

=================  ======  ====================  =====
case               dice    hd95                  nsd
=================  ======  ====================  =====
both empty         1.0     0.0                   1.0
one empty          0.0     image diagonal        0.0
=================  ======  ====================  =====

where the image diagonal is ``sqrt(sum((shape * spacing) ** 2))``, the largest distance
any two voxels of the grid can have, i.e. the worst possible HD95 for that image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = ["dice", "hd95", "nsd", "dice_per_mask", "finite_or_none", "mask_uncertainty"]

# A grid distance equal to the NSD tolerance in exact arithmetic can come out an ulp above it in
# float64 (3 voxels x 0.8 mm = 2.4000000000000004 mm); up to this relative slack it counts as within.
NSD_TIE_RTOL = 1e-9


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates a mask pair and returns both as bool arrays."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {pred.shape} and gt {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D (H, W) or 3D (D, H, W), got shape {pred.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def _check_spacing(spacing: float | Sequence[float], ndim: int) -> np.ndarray:
    """Returns ``spacing`` as a positive float array of length ``ndim``."""
    spacing_array = np.asarray(spacing, dtype=np.float64)
    if spacing_array.ndim == 0:
        spacing_array = np.full(ndim, float(spacing_array))
    if spacing_array.shape != (ndim,) or not np.all(spacing_array > 0) or not np.all(np.isfinite(spacing_array)):
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers, got {spacing!r}")
    return spacing_array


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a bool mask (face connectivity; the array border is background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each pred surface voxel to the gt surface, and vice versa.

    Both masks must be non-empty. Returns two 1D float arrays, in the units of ``spacing``.
    """
    pred_surface = _surface(pred)
    gt_surface = _surface(gt)
    # distance_transform_edt measures the distance to the nearest zero, so invert the surface.
    distance_to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)
    distance_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return distance_to_gt[pred_surface], distance_to_pred[gt_surface]


def _diagonal(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * spacing) ** 2)))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient ``2 |P & G| / (|P| + |G|)``.

    Args:
        pred: predicted mask, ``(H, W)`` or ``(D, H, W)``, bool or {0, 1}.
        gt: ground-truth mask of the same shape.

    Returns:
        DSC in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        ValueError: if the shapes differ or the masks are not 2D/3D.
    """
    pred, gt = _check_pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask surfaces.

    The 95th percentile of the pred->gt surface distances and of the gt->pred surface
    distances are taken separately and the larger one is returned (MONAI's
    ``compute_hausdorff_distance(percentile=95, directed=False)``).

    Args:
        pred: predicted mask, ``(H, W)`` or ``(D, H, W)``, bool or {0, 1}.
        gt: ground-truth mask of the same shape.
        spacing: voxel size, one number or one per axis (same axis order as the masks).

    Returns:
        HD95 in the units of ``spacing`` (pixels by default). 0.0 when both masks are
        empty; the image diagonal ``sqrt(sum((shape * spacing) ** 2))`` when exactly one
        is empty (never ``nan`` / ``inf``).

    Raises:
        ValueError: if the shapes differ, the masks are not 2D/3D, or ``spacing`` is not
            positive with one value or one per axis.
    """
    pred, gt = _check_pair(pred, gt)
    spacing_array = _check_spacing(spacing, pred.ndim)
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return 0.0
    if pred_empty or gt_empty:
        return _diagonal(pred.shape, spacing_array)
    pred_to_gt, gt_to_pred = _surface_distances(pred, gt, spacing_array)
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def nsd(
    pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, spacing: float | Sequence[float] = 1.0
) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) at a distance tolerance.

    ``(#pred surface voxels within tolerance of the gt surface + #gt surface voxels within
    tolerance of the pred surface) / (#pred surface voxels + #gt surface voxels)``.
    Surface voxels are counted, not surfel areas (MONAI ``compute_surface_dice`` with
    ``use_subvoxels=False``); a distance equal to the tolerance counts as within, also when
    float rounding puts it a hair above (``NSD_TIE_RTOL``).

    Args:
        pred: predicted mask, ``(H, W)`` or ``(D, H, W)``, bool or {0, 1}.
        gt: ground-truth mask of the same shape.
        tolerance: accepted surface deviation in the units of ``spacing`` (the MedSegX
            protocol uses 2 px).
        spacing: voxel size, one number or one per axis.

    Returns:
        NSD in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        ValueError: if the shapes differ, the masks are not 2D/3D, ``tolerance`` is
            negative or ``spacing`` is invalid.
    """
    pred, gt = _check_pair(pred, gt)
    spacing_array = _check_spacing(spacing, pred.ndim)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return 1.0
    if pred_empty or gt_empty:
        return 0.0
    pred_to_gt, gt_to_pred = _surface_distances(pred, gt, spacing_array)
    limit = tolerance * (1.0 + NSD_TIE_RTOL)
    within = int((pred_to_gt <= limit).sum()) + int((gt_to_pred <= limit).sum())
    return within / (pred_to_gt.size + gt_to_pred.size)


@torch.no_grad()
def dice_per_mask(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice of every predicted mask against the target, batched on the tensors' device.

    Args:
        logits: ``(B, M, H, W)`` mask logits (M = 3 multimask outputs for MedSegX).
        target: ``(B, 1, H, W)`` ground truth, {0, 1} (any dtype; ``> 0.5`` is foreground).
        threshold: probability threshold, a pixel is foreground when
            ``sigmoid(logit) > threshold``.

    Returns:
        ``(B, M)`` float32 Dice; 1.0 where prediction and target are both empty, 0.0
        where exactly one is. Pick the oracle mask with ``.argmax(dim=1)``.

    Raises:
        ValueError: if the shapes do not match ``(B, M, H, W)`` / ``(B, 1, H, W)`` or the
            threshold is not in (0, 1).
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, M, H, W), got shape {tuple(logits.shape)}")
    batch, _, height, width = logits.shape
    if tuple(target.shape) != (batch, 1, height, width):
        raise ValueError(
            f"target must be (B, 1, H, W) = {(batch, 1, height, width)} to match logits, got {tuple(target.shape)}"
        )
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    pred = torch.sigmoid(logits.float()) > threshold
    truth = target > 0.5
    intersection = (pred & truth).sum(dim=(2, 3)).float()
    total = pred.sum(dim=(2, 3)).float() + truth.sum(dim=(2, 3)).float()
    return torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0), torch.ones_like(total))


def mask_uncertainty(probabilities: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Disagreement of an ensemble of masks: mean mutual information (BALD) in nats.

    The members are the three multimask outputs, times the Monte-Carlo dropout passes
    through the adapters when there are several: ``H(mean p) - mean H(p)`` per pixel, i.e.
    the part of the predictive entropy the members disagree on. 0 when all members agree
    (also when all are unsure in the same way); at most ``log 2``.

    Args:
        probabilities: ``(..., H, W)`` sigmoid probabilities; every leading index is a member.
        region: optional ``(H, W)`` bool/float weights (e.g. the prompt box); default all pixels.

    Returns:
        The mean over the region's pixels.
    """
    probabilities = probabilities.float().clamp(1e-6, 1 - 1e-6)
    members = probabilities.reshape(-1, *probabilities.shape[-2:])

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log() + (1 - p) * (1 - p).log())

    mutual_information = entropy(members.mean(dim=0)) - entropy(members).mean(dim=0)
    if region is None:
        return float(mutual_information.mean())
    weights = region.float().to(mutual_information.device)
    if float(weights.sum()) <= 0:
        return 0.0
    return float((mutual_information * weights).sum() / weights.sum())


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or ``None`` when missing / nan (JSON-friendly metrics)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
