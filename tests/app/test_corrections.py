"""Corrective clicks on a 3D ROI through the real server, with the stock 3D Slicer plugin's client.

A volume request's ROI is segmented first and every click then corrects it on its own slice
(``medsegx.propagation``, wired in ``lib/infers/medsegx.py``): a foreground click adds the
structure under it and follows it to the neighbouring slices, a background click removes the
leak under it, and the server resumes a client's last request so a request with one click more
costs that click only. The requests are the plugin's (``slicer_helpers``: ``onClickDeepgrow``
params, the ROI through ``getROIPointsXYZ``), on the sample CT phantom (``ct_phantom``, labels in
``(i, j, k)``; the k axis runs with the pairs sorted, the i and j pairs come reversed).

Every test uses ROIs of its own: the server keeps sessions by image, structure, box and model,
so a test that shares a box with another would resume the other's request.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lib.infers.prompt import MAX_VOLUME_CLICKS
from medsegx.metrics import dice
from slicer_helpers import CT_LABELS, DEEPGROW, deepest_click, slicer_error, slicer_params, slicer_roi, slicer_segment

pytestmark = pytest.mark.server

#: How far past the structure's end the ROI of a leaking request reaches, in slices.
LEAK_SLICES = 5
#: What a click may cost the slices it does not touch (Dice, on the structure's other slices).
DICE_KEPT_TOLERANCE = 0.02
#: Dice of the slices a foreground click past the ROI brings in.
DICE_EXTENDED_MIN = 0.7


@pytest.fixture(scope="module")
def phantom(slicer, ct_phantom, sample_data) -> tuple:
    """(image, label, session id): the sample CT uploaded as a Slicer session of this module's own.

    Its own file, so the embeddings and kept sessions of these requests neither come from nor serve
    other modules' requests on the datastore's ``ct_phantom`` (``test_server.py`` counts cache misses).
    """
    image, label = ct_phantom
    session = slicer.create_session(str(sample_data["images"]["ct_phantom"]))
    return image, label, session["session_id"]


def request(slicer, session_id: str, label: str, roi: list[int], foreground=(), background=()):
    """(the segment Slicer imports, (i, j, k) bool; the result JSON) of one deepgrow request."""
    params = slicer_params(slicer, label, roi, foreground, background)
    result_file, result = slicer.infer(DEEPGROW, "", params, session_id=session_id)
    return slicer_segment(result_file), result


def k_extent(mask_ijk: np.ndarray) -> tuple[int, int]:
    slices = np.flatnonzero(mask_ijk.any(axis=(0, 1)))
    return int(slices[0]), int(slices[-1])


def with_k(roi: list[int], k0: int, k1: int) -> list[int]:
    """``roi`` with its k pair set (the phantom's k axis is not flipped: the pair stays sorted)."""
    return [*roi[:4], k0, k1]


def slab_dice(segment_ijk: np.ndarray, truth_ijk: np.ndarray, slices) -> float:
    slices = list(slices)
    return dice(segment_ijk[..., slices], truth_ijk[..., slices])


def farthest_from(truth_ijk: np.ndarray, segment_ijk: np.ndarray, k: int) -> list[int]:
    """The voxel of slice ``k`` of the segment farthest from the truth (a leaked voxel, else one on the edge)."""
    distance = ndimage.distance_transform_edt(~truth_ijk[..., k])
    distance[~segment_ijk[..., k]] = -1
    i, j = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [int(i), int(j), int(k)]


def test_a_background_click_removes_the_leak_on_its_slice(slicer, phantom):
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_left"]
    first, last = k_extent(kidney)
    roi = with_k(slicer_roi(kidney, image.affine), first, last + LEAK_SLICES)  # too long past the kidney's end
    before, _ = request(slicer, session_id, "kidney_left", roi)
    leak = before & ~kidney
    past_end = [k for k in range(last + 1, roi[5] + 1) if leak[..., k].any()]
    assert past_end, "a box past the kidney's end should leak there (else this test shows nothing)"
    k = past_end[0]
    click = deepest_click(leak, k)

    after, result = request(slicer, session_id, "kidney_left", roi, background=[click])
    assert not after[tuple(click)], result
    assert (after & ~kidney)[..., k].sum() < leak[..., k].sum()
    others = [z for z in range(kidney.shape[2]) if z != k]
    assert slab_dice(after, kidney, others) >= slab_dice(before, kidney, others) - DICE_KEPT_TOLERANCE


def test_a_foreground_click_past_the_roi_extends_the_mask(slicer, phantom):
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_right"]
    first, last = k_extent(kidney)
    roi_end = (first + last) // 2
    roi = with_k(slicer_roi(kidney, image.affine), first, roi_end)  # the kidney's first half only
    before, _ = request(slicer, session_id, "kidney_right", roi)
    assert not before[..., roi_end + 1:].any()  # a box's mask stays in its slices
    click = deepest_click(kidney, roi_end + 4)

    after, result = request(slicer, session_id, "kidney_right", roi, foreground=[click])
    assert after[tuple(click)], result
    beyond = range(roi_end + 1, click[2] + 1)  # between the ROI's end and the click, and the clicked slice
    assert all(after[..., k].any() for k in beyond)
    assert slab_dice(after, kidney, beyond) >= DICE_EXTENDED_MIN
    inside = range(first, roi_end + 1)
    assert slab_dice(after, kidney, inside) >= slab_dice(before, kidney, inside) - DICE_KEPT_TOLERANCE


def test_clicks_on_three_slices_all_act(slicer, phantom):
    """A box that misses the kidney's first slices and leaks past its end: a foreground click before the
    box, a background click on the leak, a background click on a middle slice's edge."""
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_left"]
    first, last = k_extent(kidney)
    roi = with_k(slicer_roi(kidney, image.affine), first + 5, last + LEAK_SLICES)
    before, _ = request(slicer, session_id, "kidney_left", roi)
    missed = deepest_click(kidney, first + 2)
    leak = before & ~kidney
    leaked_slices = [k for k in range(last + 1, roi[5] + 1) if leak[..., k].any()]
    assert leaked_slices, "a box past the kidney's end should leak there"
    leaked = deepest_click(leak, leaked_slices[0])
    edge = farthest_from(kidney, before, (first + last) // 2)
    assert not before[tuple(missed)] and before[tuple(leaked)] and before[tuple(edge)]  # each click has work to do

    after, result = request(slicer, session_id, "kidney_left", roi, foreground=[missed], background=[leaked, edge])
    assert after[tuple(missed)], result
    assert not after[tuple(leaked)] and not after[tuple(edge)], result


def test_a_thousand_clicks_get_a_422_naming_the_limit(slicer, slicer_client_module, phantom):
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_left"]
    roi = slicer_roi(kidney, image.affine)
    clicks = [[int(i), int(j), int(k)] for i, j, k in np.argwhere(kidney)[:1000]]
    with pytest.raises(slicer_client_module.MONAILabelClientException) as raised:
        request(slicer, session_id, "kidney_left", roi, foreground=clicks)
    status, detail = slicer_error(raised.value)
    assert status == 422 and "Status: 422" in raised.value.msg
    assert "1000 clicks" in detail and f"at most {MAX_VOLUME_CLICKS}" in detail, detail


def test_a_foreground_click_outside_the_roi_in_i_widens_it(slicer, phantom):
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_left"]
    roi = slicer_roi(kidney, image.affine)
    i_low, i_high = sorted(roi[:2])
    i_cut = i_low + (i_high - i_low) // 3
    roi[:2] = [i_high, i_cut] if roi[0] > roi[1] else [i_cut, i_high]  # the ROI leaves out the kidney's low third
    before, _ = request(slicer, session_id, "kidney_left", roi)
    left_out = kidney & ~before
    left_out[i_cut:] = False
    k = int(np.argmax(left_out.sum(axis=(0, 1))))
    click = deepest_click(left_out, k)
    assert not before[tuple(click)] and kidney[tuple(click)]

    after, result = request(slicer, session_id, "kidney_left", roi, foreground=[click])
    assert after[tuple(click)], result
    assert dice(after[..., k], kidney[..., k]) > dice(before[..., k], kidney[..., k])


def test_a_background_click_outside_the_roi_in_k_changes_nothing(slicer, phantom):
    """Documented: a background click on a slice the box's mask cannot reach has nothing to remove."""
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_right"]
    first, last = k_extent(kidney)
    roi = with_k(slicer_roi(kidney, image.affine), first + 3, last)
    before, _ = request(slicer, session_id, "kidney_right", roi)
    after, result = request(slicer, session_id, "kidney_right", roi, background=[deepest_click(kidney, first + 1)])
    assert after.sum() == before.sum() > 0 and np.array_equal(after, before), result


@pytest.mark.parametrize("point", [[400, 10, 20], [100, 100, 48]], ids=["outside-in-i", "outside-in-k"])
def test_a_click_outside_the_image_is_a_422_naming_the_point(slicer, slicer_client_module, phantom, point):
    image, label, session_id = phantom
    roi = slicer_roi(label == CT_LABELS["kidney_left"], image.affine)
    with pytest.raises(slicer_client_module.MONAILabelClientException) as raised:
        request(slicer, session_id, "kidney_left", roi, foreground=[point])
    status, detail = slicer_error(raised.value)
    assert status == 422 and "outside the image" in detail, detail
    assert "[" + ", ".join(f"{float(v)}" for v in point) + "]" in detail, detail  # the point, as sent


def test_the_next_click_resumes_and_two_clients_keep_their_own(server, slicer_client_module, phantom,
                                                              tmp_path):
    image, label, session_id = phantom
    kidney = label == CT_LABELS["kidney_right"]
    first, last = k_extent(kidney)
    roi_end = (first + last) // 2 + 1
    roi = with_k(slicer_roi(kidney, image.affine), first + 1, roi_end)  # a box of this test only
    reader = slicer_client_module.MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="reader")
    other = slicer_client_module.MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="other-reader")

    box_only, box_result = request(reader, session_id, "kidney_right", roi)
    edge = farthest_from(kidney, box_only, (first + roi_end) // 2)
    assert box_only[tuple(edge)]
    with_edge, edge_result = request(reader, session_id, "kidney_right", roi, background=[edge])
    box_slices = box_result["latencies"]["model"]["slices"]
    assert box_slices >= roi_end - first  # the box's slices were decoded
    assert edge_result["latencies"]["model"]["slices"] < box_slices, edge_result  # the click only
    assert not with_edge[tuple(edge)]

    extend = deepest_click(kidney, roi_end + 3)
    extended, _ = request(reader, session_id, "kidney_right", roi, foreground=[extend], background=[edge])
    assert extended[tuple(extend)] and extended[..., roi_end + 1:].any()
    assert not extended[tuple(edge)]  # resumed with the background click still applied

    their_click = farthest_from(kidney, box_only, roi_end)
    theirs, their_result = request(other, session_id, "kidney_right", roi, background=[their_click])
    assert not theirs[..., roi_end + 1:].any(), their_result  # not the first reader's foreground click
    assert theirs[tuple(edge)] and not theirs[tuple(their_click)]  # nor its background click; their own
