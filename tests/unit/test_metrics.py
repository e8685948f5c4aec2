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


# -- against MONAI's own metrics ------------------------------------------------------------
GRID = (20, 40, 50)
SPACING_MM = (3.0, 0.8, 0.8)  # thick slices, fine in-plane: a CT series


def ellipsoid(center_mm: tuple[float, ...], radii_mm: tuple[float, ...]) -> np.ndarray:
    """A solid ellipsoid on ``GRID`` in millimetres (voxel ``i`` sits at ``i * spacing``)."""
    coordinates = np.indices(GRID, dtype=np.float64) * np.reshape(SPACING_MM, (3, 1, 1, 1))
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip(coordinates, center_mm, radii_mm)) <= 1.0


def _mask_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    gt = ellipsoid((28.5, 16.0, 19.2), (21.0, 11.0, 14.0))
    smaller = ellipsoid((31.5, 14.4, 21.6), (18.0, 12.5, 12.0))  # other size and centre, overlapping
    shifted = np.roll(gt, (1, 3, -2), axis=(0, 1, 2))  # the same shape moved 3 mm, 2.4 mm, -1.6 mm
    # two more cut by the grid's first slice and its last rows: border voxels count as surface
    cut = ellipsoid((3.0, 26.0, 32.0), (15.0, 8.0, 9.0))
    cut_smaller = ellipsoid((6.0, 28.0, 30.0), (12.0, 7.0, 10.0))
    return {"overlapping": (smaller, gt), "shifted": (shifted, gt), "cut_by_border": (cut_smaller, cut)}


MASK_PAIRS = _mask_pairs()


def _monai_input(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask)[None, None].float()  # (B=1, C=1, D, H, W), one-hot of one class


@pytest.mark.parametrize("pair", list(MASK_PAIRS))
def test_dice_matches_monai(pair):
    """``dice`` equals MONAI's ``compute_dice`` / ``DiceMetric``; 1e-6 covers MONAI's float32."""
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI (the app extra) is not installed")
    pred, gt = MASK_PAIRS[pair]
    assert 0.3 < dice(pred, gt) < 0.95  # real overlap, neither trivial case
    expected = monai_metrics.compute_dice(_monai_input(pred), _monai_input(gt), include_background=True).item()
    assert dice(pred, gt) == pytest.approx(expected, abs=1e-6)
    metric = monai_metrics.DiceMetric(include_background=True, reduction="mean")
    metric(_monai_input(pred), _monai_input(gt))
    assert dice(pred, gt) == pytest.approx(metric.aggregate().item(), abs=1e-6)


@pytest.mark.parametrize("pair", list(MASK_PAIRS))
@pytest.mark.parametrize("tolerance_mm", [0.8, 1.0, 2.0, 2.4, 3.0, 4.0])
def test_nsd_matches_monai_surface_dice(pair, tolerance_mm):
    """``nsd`` equals MONAI's ``compute_surface_dice(use_subvoxels=False)`` to 1e-6.

    Both take the surface as ``mask ^ binary_erosion(mask)`` with scipy's face-connected
    structure, the grid border counting as background (MONAI crops to the union's box with a
    1-voxel margin first, which moves no distance), and Euclidean distances between surface
    voxel centres scaled by the spacing (MONAI: a KD-tree; medsegx: a distance transform), so
    the voxel counts agree exactly. What is left is MONAI's float32 result (~1e-8), hence 1e-6.

    Tolerances 0.8, 2.4 and 3.0 mm are ties: 1 and 3 in-plane steps, 1 slice. In float64
    3 * 0.8 = 2.4000000000000004 > 2.4, which MONAI counts as within only because it casts the
    distances and the tolerance to float32; before ``NSD_TIE_RTOL`` medsegx dropped those voxels
    (NSD 0.589 vs MONAI 0.625 on the overlapping pair), against its own rule that a distance equal
    to the tolerance counts as within.
    """
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI (the app extra) is not installed")
    pred, gt = MASK_PAIRS[pair]
    expected = monai_metrics.compute_surface_dice(
        _monai_input(pred), _monai_input(gt), class_thresholds=[tolerance_mm], include_background=True,
        spacing=SPACING_MM, use_subvoxels=False,
    ).item()
    assert 0.0 < expected < 1.0  # neither trivial case
    assert nsd(pred, gt, tolerance=tolerance_mm, spacing=SPACING_MM) == pytest.approx(expected, abs=1e-6)


def test_the_border_pair_touches_the_border():
    """``cut_by_border`` checks the border convention: both surfaces include voxels on the grid's faces."""
    for mask in MASK_PAIRS["cut_by_border"]:
        assert mask[0].any() and mask[:, -1].any()
