"""medsegx.losses.DiceBCEMinLoss: min over the 3 masks, gradients, reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsegx.losses import DiceBCEMinLoss


def make_target(batch: int = 2, size: int = 16) -> torch.Tensor:
    target = torch.zeros(batch, 1, size, size)
    target[0, 0, 4:12, 4:12] = 1
    if batch > 1:
        target[1, 0, 2:6, 3:15] = 1
    return target


def perfect_logits(target: torch.Tensor, magnitude: float = 20.0) -> torch.Tensor:
    return torch.where(target > 0, magnitude, -magnitude)


def test_perfect_logits_give_near_zero_loss():
    target = make_target()
    logits = perfect_logits(target).repeat(1, 3, 1, 1)
    assert DiceBCEMinLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-4)


def test_min_over_masks_picks_best_channel():
    torch.manual_seed(0)
    target = make_target()
    logits = torch.randn(2, 3, 16, 16)
    logits[0, 1] = perfect_logits(target[0, 0])
    logits[1, 2] = perfect_logits(target[1, 0])
    logits[:, 0] = -perfect_logits(target[:, 0])  # the inverse: the worst possible
    loss_fn = DiceBCEMinLoss(reduction="none")
    loss, index = loss_fn(logits, target, return_index=True)
    assert index.tolist() == [1, 2]
    assert index.dtype == torch.long
    per_mask = loss_fn.per_mask(logits, target)
    assert per_mask.shape == (2, 3)
    assert torch.allclose(loss, per_mask[torch.arange(2), index])
    assert torch.all(per_mask[:, 0] > per_mask.min(dim=1).values)


def test_gradient_flows_only_through_min_channel():
    torch.manual_seed(0)
    target = make_target()
    logits = torch.randn(2, 3, 16, 16)
    logits[0, 2] = perfect_logits(target[0, 0], magnitude=2.0)
    logits[1, 0] = perfect_logits(target[1, 0], magnitude=2.0)
    logits.requires_grad_(True)
    loss, index = DiceBCEMinLoss()(logits, target, return_index=True)
    loss.backward()
    assert index.tolist() == [2, 0]
    for b, best in enumerate(index.tolist()):
        for m in range(3):
            grad_norm = logits.grad[b, m].abs().sum().item()
            if m == best:
                assert grad_norm > 0
            else:
                assert grad_norm == 0


def test_reductions():
    torch.manual_seed(1)
    target = make_target(batch=2)
    logits = torch.randn(2, 3, 16, 16)
    per_sample = DiceBCEMinLoss(reduction="none")(logits, target)
    assert per_sample.shape == (2,)
    assert torch.allclose(DiceBCEMinLoss()(logits, target), per_sample.mean())
    assert torch.allclose(DiceBCEMinLoss(reduction="sum")(logits, target), per_sample.sum())
    assert DiceBCEMinLoss()(logits, target).ndim == 0


def test_matches_hand_written_formula():
    torch.manual_seed(2)
    target = make_target(batch=1)
    logits = torch.randn(1, 3, 16, 16)
    probabilities = torch.sigmoid(logits)
    expected = []
    for m in range(3):
        p, g = probabilities[0, m], target[0, 0]
        dice_loss = 1 - (2 * (p * g).sum() + 1e-5) / ((p * p).sum() + (g * g).sum() + 1e-5)
        bce = F.binary_cross_entropy_with_logits(logits[0, m], g)
        expected.append(dice_loss + bce)
    assert DiceBCEMinLoss()(logits, target).item() == pytest.approx(min(expected).item(), rel=1e-5)


def test_matches_monai_dice_plus_bce():
    monai_losses = pytest.importorskip("monai.losses", reason="MONAI (the app extra) is not installed")
    torch.manual_seed(3)
    target = make_target(batch=2)
    logits = torch.randn(2, 3, 16, 16)
    monai_dice = monai_losses.DiceLoss(sigmoid=True, squared_pred=True, reduction="none")
    dice_loss = monai_dice(logits, target.expand_as(logits)).flatten(1)  # (B, 3)
    bce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none").mean(dim=(2, 3))
    expected = (dice_loss + bce).min(dim=1).values
    assert torch.allclose(DiceBCEMinLoss(reduction="none")(logits, target), expected, atol=1e-6)


def test_empty_target_with_background_prediction_is_finite_and_small():
    target = torch.zeros(1, 1, 8, 8)
    logits = torch.full((1, 3, 8, 8), -20.0)
    loss = DiceBCEMinLoss()(logits, target)
    assert torch.isfinite(loss)
    assert loss.item() < 1e-3


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="reduction"):
        DiceBCEMinLoss(reduction="max")
    with pytest.raises(ValueError, match="target"):
        DiceBCEMinLoss()(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="logits"):
        DiceBCEMinLoss()(torch.zeros(3, 8, 8), torch.zeros(3, 1, 8, 8))
