"""``medsegx.propagation``: a 3D box, clicks on any slice as keyframes, and the session cache.

The mechanics run on a weight-free stand-in (the mask is the bright pixels inside each box), so
what propagation and corrections do is exact; the real weights run on a synthetic CT ellipsoid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsegx.build import build_model
from medsegx.metrics import dice
from medsegx.predictor import Predictor
from medsegx.propagation import (
    Click,
    Prediction3D,
    PropagationSettings,
    SessionCache,
    VolumeSession,
    predict_3d,
    predict_3d_clicks,
    segment,
)
from medsegx.taxonomy import resolve
from medsegx.transforms import prepare_volume

LIVER = resolve("liver", "CT")
SIZE = 256


class BrightInBox(torch.nn.Module):
    """Weight-free stand-in: the "embedding" is the image, each box's mask = the bright pixels inside it."""

    backbone = "stub"

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.encode_calls = 0
        self.boxes: list[list[float]] = []

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images / 255.0

    def encode(self, images: torch.Tensor, context: torch.Tensor):
        self.encode_calls += 1
        return images[:, :1].clone(), torch.zeros(images.shape[0], 2, 4)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, points=None):
        size = embeddings.shape[-1]
        rows, cols = torch.arange(size)[:, None], torch.arange(size)[None]
        logits = []
        for index, box in enumerate(boxes):
            x0, y0, x1, y1 = box.tolist()
            self.boxes.append([x0, y0, x1, y1])
            inside = ((cols >= math.floor(x0)) & (cols <= math.ceil(x1))
                      & (rows >= math.floor(y0)) & (rows <= math.ceil(y1)))
            foreground = (embeddings[min(index, embeddings.shape[0] - 1), 0] > 0.5) & inside
            logits.append(torch.where(foreground, 10.0, -10.0)[None].repeat(3, 1, 1))
        return torch.stack(logits), torch.tensor([[0.9, 0.5, 0.1]]).repeat(len(boxes), 1)


def disk(center: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[:SIZE, :SIZE]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2


def moving_disk_volume(depth=30, first=10, last=20):
    """A disk on slices first..last whose centre moves 2 px per slice, plus a bright distractor."""
    objects = np.zeros((depth, SIZE, SIZE), dtype=bool)
    for z in range(first, last + 1):
        objects[z] = disk((100 + 2 * (z - first), 90 + 2 * (z - first)), 18 - abs(z - 15))
    distractor = np.zeros_like(objects)
    distractor[:, 200:240, 200:240] = True  # bright, on every slice, outside the user's box
    return np.where(objects | distractor, 200, 20).astype(np.uint8), objects


def as_volume(objects: np.ndarray) -> np.ndarray:
    return np.where(objects, 200, 20).astype(np.uint8)


def test_a_3d_box_follows_the_object_and_stops_where_it_ends():
    volume, objects = moving_disk_volume()
    model = BrightInBox()
    result = predict_3d(Predictor(model, cache_size=64), volume, (60, 70, 160, 170, 0, 29), LIVER)
    assert isinstance(result, Prediction3D)
    assert 10 <= result.middle_slice <= 20  # started where the object is
    assert np.array_equal(result.mask, objects)  # 256 x 256 slices: the stub is exact
    assert 9 in result.slices and 21 in result.slices  # the empty slices that ended it
    boxes = np.array(model.boxes)
    assert boxes[:, :2].min() >= 50 and boxes[:, 2:].max() <= 180  # inside the box grown by 0.1 x 100 px
    assert result.timings["total_ms"] >= result.timings["decode_ms"] > 0


def test_a_box_on_empty_tissue_gives_an_empty_mask():
    volume, _ = moving_disk_volume()
    assert not predict_3d(Predictor(BrightInBox()), volume, (0, 0, 40, 40, 0, 29), LIVER).mask.any()


@pytest.mark.parametrize(
    ("volume", "box3d", "message"),
    [
        (np.zeros((4, 32, 32), np.uint8), (0, 0, 10, 10, 6, 9), r"box3d .*32 x 32 x 4.*z range entirely outside"),
        (np.zeros((4, 32, 32), np.uint8), (0, 0, 10, 10, 3, 1), "inverted, need z0 <= z1"),
        (np.zeros((4, 32, 32), np.uint8), (0, 0, 10, 10), "6 finite numbers"),
        (np.zeros((32, 32), np.uint8), (0, 0, 10, 10, 0, 1), r"volume must be \(Z, H, W\)"),
        (np.zeros((4, 32, 32), np.float32), (0, 0, 10, 10, 0, 1), "uint8.*prepare_volume"),
    ],
)
def test_bad_3d_inputs(volume, box3d, message):
    with pytest.raises(ValueError, match=message):
        predict_3d(Predictor(BrightInBox()), volume, box3d, LIVER)


def test_clicks_need_a_foreground_click_on_the_volume():
    volume, _ = moving_disk_volume()
    with pytest.raises(ValueError, match="at least one foreground click"):
        segment(Predictor(BrightInBox()), volume, LIVER, clicks=[Click(90, 100, 12, False)])
    with pytest.raises(ValueError, match="outside the volume"):
        segment(Predictor(BrightInBox()), volume, LIVER, clicks=[Click(90, 100, 40, True)])


def test_a_foreground_click_past_where_the_box_stopped_extends_the_mask():
    objects = np.zeros((30, SIZE, SIZE), dtype=bool)
    for z in list(range(5, 14)) + list(range(16, 24)):  # the structure fades out on slices 14 and 15
        objects[z] = disk((120, 120), 20)
    volume = as_volume(objects)
    predictor = Predictor(BrightInBox(), cache_size=64)
    box3d = (95, 95, 145, 145, 5, 23)
    before = segment(predictor, volume, LIVER, box3d=box3d).mask
    assert np.array_equal(before[:14], objects[:14]) and not before[14:].any()  # the box round stopped at the gap
    after = segment(predictor, volume, LIVER, box3d=box3d, clicks=[Click(120, 120, 19, True)]).mask
    assert np.array_equal(after, objects)  # the click's slice and, from it, the rest of the structure
    outside = segment(predictor, volume, LIVER, box3d=(95, 95, 145, 145, 5, 12), clicks=[Click(120, 120, 19, True)])
    # a click past the box's last slice: the range grows that way, from the click on
    assert np.array_equal(outside.mask[16:], objects[16:]) and np.array_equal(outside.mask[:13], objects[:13])


def test_a_background_click_removes_a_leak_and_stops_propagation_crossing_it():
    objects = np.zeros((30, SIZE, SIZE), dtype=bool)
    for z in range(5, 16):
        objects[z] = disk((120, 120), 20)
    leak = np.zeros_like(objects)
    for z in range(16, 26):  # something bright right past the structure's end, where a loose box leaks into it
        leak[z] = disk((122, 122), 16)
    volume = as_volume(objects | leak)
    predictor = Predictor(BrightInBox(), cache_size=64)
    box3d = (95, 95, 145, 145, 5, 25)
    before = segment(predictor, volume, LIVER, box3d=box3d).mask
    assert before[16:26].any(axis=(1, 2)).all()  # the box round went on into the leak
    after = segment(predictor, volume, LIVER, box3d=box3d, clicks=[Click(122, 122, 16, False)]).mask
    assert not after[16:].any()  # the clicked slice is emptied and nothing is reached through it
    assert np.array_equal(after[:16], before[:16])


def test_a_background_click_carves_a_leak_joined_to_the_structure():
    objects = np.zeros((20, SIZE, SIZE), dtype=bool)
    for z in range(2, 18):
        objects[z] = disk((120, 120), 25)
    bar = np.zeros_like(objects)
    bar[8:12, 112:128, 145:175] = True  # a bright bar touching the structure on 4 slices
    volume = as_volume(objects | bar)
    predictor = Predictor(BrightInBox(), cache_size=64)
    box3d = (90, 90, 180, 150, 2, 17)
    before = segment(predictor, volume, LIVER, box3d=box3d).mask
    click = Click(165, 120, 10, False)
    after = segment(predictor, volume, LIVER, box3d=box3d, clicks=[click]).mask
    assert before[10, 120, 165] and not after[10, 120, 165]
    assert (after & bar & ~objects).sum() < (before & bar & ~objects).sum()
    assert (after & objects).sum() == (before & objects).sum()  # the structure itself is kept


def test_clicks_on_three_slices_all_act():
    objects = np.zeros((30, SIZE, SIZE), dtype=bool)
    for z in range(3, 27):
        objects[z] = disk((120, 120), 20)
    extra = np.zeros_like(objects)
    for z in (6, 14, 22):  # a bump on three slices that the first box leaves out
        extra[z] = disk((120, 150), 9) & ~objects[z]
    volume = as_volume(objects | extra)
    predictor = Predictor(BrightInBox(), cache_size=64)
    box3d = (98, 98, 142, 142, 3, 26)
    before = segment(predictor, volume, LIVER, box3d=box3d).mask
    clicks = [Click(153, 120, z, True) for z in (6, 14, 22)]
    after = segment(predictor, volume, LIVER, box3d=box3d, clicks=clicks).mask
    for z in (6, 14, 22):
        assert not before[z, 120, 153] and after[z, 120, 153], z


def test_the_session_cache_resumes_the_last_request_and_matches_a_replay():
    volume, objects = moving_disk_volume()
    box3d = (60, 70, 160, 170, 0, 29)
    clicks = [Click(94, 104, 12, True), Click(125, 120, 18, False)]
    cache = SessionCache()
    model = BrightInBox()
    predictor = Predictor(model, cache_size=64)
    segment(predictor, volume, LIVER, box3d=box3d, clicks=clicks[:1], cache=cache, cache_key="ct")
    decoded = len(model.boxes)
    resumed = segment(predictor, volume, LIVER, box3d=box3d, clicks=clicks, cache=cache, cache_key="ct")
    assert cache.hits == 1 and len(model.boxes) - decoded < decoded  # only the new click was worked out
    replayed = segment(Predictor(BrightInBox()), volume, LIVER, box3d=box3d, clicks=clicks)
    assert np.array_equal(resumed.mask, replayed.mask)
    other = segment(predictor, volume, LIVER, box3d=box3d, clicks=[Click(100, 100, 20, True)], cache=cache,
                    cache_key="ct")  # another client's click: not a continuation of the kept ones
    assert cache.misses == 2 and other.clicks == [Click(100, 100, 20, True)]


def test_the_session_cache_is_bounded_in_bytes():
    volume, _ = moving_disk_volume()
    one_mask = volume.size // 8
    cache = SessionCache(max_bytes=2 * one_mask)
    predictor = Predictor(BrightInBox(), cache_size=64)
    for index in range(4):
        segment(predictor, volume, LIVER, box3d=(60, 70, 160, 170, 0, 29), cache=cache, cache_key=index)
    assert len(cache) == 2 and cache.nbytes <= 2 * one_mask
    with pytest.raises(ValueError, match="max_bytes"):
        SessionCache(max_bytes=-1)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="margin >= 0"):
        PropagationSettings(margin=-1)
    volume, _ = moving_disk_volume()
    with pytest.raises(ValueError, match="z_range"):
        VolumeSession(Predictor(BrightInBox()), volume, LIVER, z_range=(20, 10))


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def lite_model():
    return build_model("lite")


def ellipsoid_volume():
    """48 slices: a bright ellipsoid (slices 20..28) in a darker body, HU -> prepared uint8."""
    depth, height, width = 48, 128, 160
    z, y, x = np.ogrid[:depth, :height, :width]
    organ = ((z - 24) / 4.5) ** 2 + ((y - 60) / 22) ** 2 + ((x - 85) / 28) ** 2 <= 1
    body = ((y - 64) / 58) ** 2 + ((x - 80) / 74) ** 2 <= 1
    hu = np.where(body, 0.0, -1000.0) + np.zeros((depth, 1, 1))
    hu[organ] = 150.0
    hu += np.random.default_rng(0).normal(0.0, 10.0, hu.shape)
    return prepare_volume(hu, "CT", LIVER, channels=1), organ


def test_lite_3d_box_on_an_ellipsoid(lite_model):
    volume, organ = ellipsoid_volume()
    slices = np.flatnonzero(organ.any(axis=(1, 2)))
    rows, cols = np.flatnonzero(organ.any(axis=(0, 2))), np.flatnonzero(organ.any(axis=(0, 1)))
    box3d = (cols[0] - 3, rows[0] - 3, cols[-1] + 3, rows[-1] + 3, slices[0], slices[-1])
    result = predict_3d(Predictor(lite_model), volume, box3d, LIVER, key="ellipsoid")
    assert dice(result.mask, organ) >= 0.9
    assert slices[0] <= result.middle_slice <= slices[-1]


def test_lite_3d_clicks_propagate_through_the_ellipsoid(lite_model):
    volume, organ = ellipsoid_volume()
    slices = np.flatnonzero(organ.any(axis=(1, 2)))
    result = predict_3d_clicks(Predictor(lite_model), volume, [(85, 60, 1)], 24, LIVER, key="ellipsoid")
    assert dice(result.mask, organ) >= 0.85
    assert result.middle_slice == 24
    assert not result.mask[: slices[0] - 1].any() and not result.mask[slices[-1] + 2:].any()
