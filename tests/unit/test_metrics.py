"""Hand-computed checks of medsegx.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsegx.metrics import dice, dice_per_mask, hd95, nsd


def square(shape: tuple[int, ...], start: tuple[int, ...], side: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(begin, begin + side) for begin in start)] = True
    return mask


def test_dice_two_overlapping_squares():
    # 10x10 squares offset by 5 rows and 5 cols: overlap 5x5 = 25, Dice = 2*25 / (100+100).
    pred = square((20, 20), (0, 0), 10)
    gt = square((20, 20), (5, 5), 10)
    assert dice(pred, gt) == pytest.approx(0.25)
    assert dice(gt, pred) == pytest.approx(0.25)


def test_dice_half_overlap_3d():
    pred = square((8, 8, 8), (0, 0, 0), 4)
    gt = square((8, 8, 8), (2, 0, 0), 4)  # overlap 2x4x4 = 32 of 64 each
    assert dice(pred, gt) == pytest.approx(0.5)


def test_dice_empty_masks():
    empty = np.zeros((16, 16), dtype=bool)
    full = square((16, 16), (4, 4), 4)
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0
    assert dice(full.astype(np.uint8), full.astype(np.uint8)) == 1.0


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_hd95_of_shifted_square_equals_shift(shift):
    gt = square((40, 40), (10, 10), 10)
    pred = square((40, 40), (10, 10 + shift), 10)
    assert hd95(pred, gt) == pytest.approx(shift)
    assert hd95(gt, pred) == pytest.approx(shift)


def test_hd95_3d_with_anisotropic_spacing():
    gt = square((20, 20, 20), (5, 5, 5), 8)
    pred = square((20, 20, 20), (7, 5, 5), 8)  # shifted 2 voxels along axis 0
    assert hd95(pred, gt) == pytest.approx(2.0)
    assert hd95(pred, gt, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(pred, gt, spacing=0.5) == pytest.approx(1.0)


def test_hd95_identical_and_empty():
    gt = square((32, 48), (4, 4), 8)
    empty = np.zeros_like(gt)
    assert hd95(gt, gt) == 0.0
    assert hd95(empty, empty) == 0.0
    # One empty mask -> the image diagonal, never nan / inf.
    assert hd95(empty, gt) == pytest.approx(math.hypot(32, 48))
    assert hd95(gt, empty, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(64, 48))


def test_nsd_identical_is_one():
    gt = square((32, 32), (8, 8), 12)
    assert nsd(gt, gt) == 1.0
    assert nsd(gt, gt, tolerance=0.0) == 1.0


def test_nsd_single_pixels_at_distance_three():
    pred = np.zeros((16, 16), dtype=bool)
    gt = np.zeros((16, 16), dtype=bool)
    pred[5, 5] = True
    gt[5, 8] = True
    assert nsd(pred, gt, tolerance=2.0) == 0.0
    assert nsd(pred, gt, tolerance=3.0) == 1.0  # the tolerance is inclusive


def test_nsd_shift_within_and_beyond_tolerance():
    gt = square((40, 40), (10, 10), 10)
    assert nsd(square((40, 40), (10, 11), 10), gt, tolerance=2.0) == 1.0
    far = nsd(square((40, 40), (10, 15), 10), gt, tolerance=2.0)
    assert 0.0 < far < 1.0


def test_nsd_empty_masks():
    empty = np.zeros((16, 16), dtype=bool)
    full = square((16, 16), (4, 4), 4)
    assert nsd(empty, empty) == 1.0
    assert nsd(full, empty) == 0.0
    assert nsd(empty, full) == 0.0


@pytest.mark.parametrize("metric", [dice, hd95, nsd])
def test_shape_mismatch_raises(metric):
    with pytest.raises(ValueError, match="same shape"):
        metric(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


@pytest.mark.parametrize("metric", [dice, hd95, nsd])
def test_one_dimensional_raises(metric):
    with pytest.raises(ValueError, match="2D"):
        metric(np.zeros(4, bool), np.zeros(4, bool))


def test_bad_spacing_and_tolerance_raise():
    mask = square((8, 8), (2, 2), 3)
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        nsd(mask, mask, spacing=0.0)
    with pytest.raises(ValueError, match="tolerance"):
        nsd(mask, mask, tolerance=-1.0)


def test_dice_per_mask_matches_numpy_dice():
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1
    target[1, 0, 0:8, 0:16] = 1
    logits = torch.full((2, 3, 16, 16), -10.0)
    logits[:, 0] = torch.where(target[:, 0] > 0, 10.0, -10.0)  # exact
    logits[0, 1, 4:12, 8:16] = 10.0  # half overlap
    logits[:, 2] = 10.0  # everything foreground
    scores = dice_per_mask(logits, target)
    assert scores.shape == (2, 3)
    for b in range(2):
        for m in range(3):
            expected = dice((logits[b, m] > 0).numpy(), (target[b, 0] > 0).numpy())
            assert scores[b, m].item() == pytest.approx(expected)
    assert scores[:, 0].tolist() == [1.0, 1.0]
    assert scores[0, 1].item() == pytest.approx(0.5)


def test_dice_per_mask_empty_conventions():
    target = torch.zeros(1, 1, 8, 8)
    logits = torch.full((1, 3, 8, 8), -5.0)
    logits[0, 2, 0, 0] = 5.0
    assert dice_per_mask(logits, target).tolist() == [[1.0, 1.0, 0.0]]


def test_dice_per_mask_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        dice_per_mask(torch.zeros(3, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="target"):
        dice_per_mask(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8))
