"""Training loss of MedSegX: Dice + BCE per multimask output, minimum over the masks."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DiceBCEMinLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class DiceBCEMinLoss(nn.Module):
    """Sigmoid Dice (squared denominator) + BCE-with-logits, minimum over the masks.

    For sample ``b`` and mask channel ``m`` with probabilities ``p = sigmoid(logits)`` and
    ground truth ``g``::

        dice[b, m] = 1 - (2 * sum(p * g) + smooth_nr) / (sum(p ** 2) + sum(g ** 2) + smooth_dr)
        bce[b, m]  = mean over pixels of BCEWithLogits(logits, g)
        loss[b]    = min over m of (dice[b, m] + bce[b, m])

    which is MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)`` per channel plus
    ``BCEWithLogitsLoss``, as in the MedSegX training recipe. Only the minimum channel
    receives a gradient for each sample (the other multimask outputs are free to
    specialise).

    Args:
        reduction: ``"mean"`` (over the batch, default), ``"sum"`` or ``"none"`` (a ``(B,)``
            tensor, one loss per sample).
        smooth_nr: numerator smoothing (MONAI default 1e-5).
        smooth_dr: denominator smoothing (MONAI default 1e-5); keeps an empty target with
            an all-background prediction at Dice loss ~0 instead of nan.

    Raises:
        ValueError: if ``reduction`` is not one of ``"mean"``, ``"sum"``, ``"none"``, or a
            smoothing term is negative.
    """

    def __init__(self, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if smooth_nr < 0 or smooth_dr < 0:
            raise ValueError(f"smooth_nr and smooth_dr must be >= 0, got {smooth_nr!r} and {smooth_dr!r}")
        self.reduction = reduction
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def per_mask(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + BCE of every mask channel, before the minimum.

        Args:
            logits: ``(B, M, H, W)`` mask logits.
            target: ``(B, 1, H, W)`` ground truth in {0, 1} (any dtype).

        Returns:
            ``(B, M)`` float loss per sample and mask.

        Raises:
            ValueError: if the shapes do not match.
        """
        if logits.ndim != 4:
            raise ValueError(f"logits must be (B, M, H, W), got shape {tuple(logits.shape)}")
        batch, _, height, width = logits.shape
        if tuple(target.shape) != (batch, 1, height, width):
            raise ValueError(
                f"target must be (B, 1, H, W) = {(batch, 1, height, width)} to match logits, "
                f"got {tuple(target.shape)}"
            )
        logits = logits.float()
        target = target.to(dtype=logits.dtype).expand_as(logits)
        probabilities = torch.sigmoid(logits)
        spatial = (2, 3)
        intersection = (probabilities * target).sum(dim=spatial)
        denominator = (probabilities * probabilities).sum(dim=spatial) + (target * target).sum(dim=spatial)
        dice_loss = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        bce_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=spatial)
        return dice_loss + bce_loss

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, return_index: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Computes the min-over-masks loss.

        Args:
            logits: ``(B, M, H, W)`` mask logits (M = 3 multimask outputs).
            target: ``(B, 1, H, W)`` ground truth in {0, 1}.
            return_index: also return which mask channel gave each sample's minimum.

        Returns:
            The loss (a scalar for ``"mean"`` / ``"sum"``, ``(B,)`` for ``"none"``); with
            ``return_index=True`` a tuple ``(loss, index)`` where ``index`` is a ``(B,)``
            long tensor of channel indices in ``0..M-1``.

        Raises:
            ValueError: if the shapes do not match.
        """
        per_sample, index = self.per_mask(logits, target).min(dim=1)
        if self.reduction == "mean":
            loss = per_sample.mean()
        elif self.reduction == "sum":
            loss = per_sample.sum()
        else:
            loss = per_sample
        if return_index:
            return loss, index
        return loss
