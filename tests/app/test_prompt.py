"""``roi`` (3D Slicer's layout) / ``slice`` / clicks / label validation in the loaded image's voxel indices."""

import pytest
from lib.infers.prompt import MAX_VOLUME_CLICKS, RequestError, check_required, parse_label, parse_prompt

VOLUME = (192, 160, 48)  # (X, Y, Z) as MONAI's LoadImage returns it
LABELS = {"liver": 1, "spleen": 2}


def test_slicer_roi_layout_with_unsorted_pairs():
    # getROIPointsXYZ: [i_a, i_b, j_a, j_b, k_a, k_b]; a flipped axis gives i_a > i_b
    prompt = parse_prompt({"roi": [40, 10, 20, 30, 30, 5]}, VOLUME)
    assert prompt.box_xyxy == (10, 20, 40, 30)
    assert prompt.z_range == (5, 30) and prompt.is_3d and prompt.slice_index == 17


def test_2d_by_equal_k_or_slice():
    assert not parse_prompt({"roi": [1, 3, 2, 4, 7, 7]}, VOLUME).is_3d
    prompt = parse_prompt({"roi": [1, 3, 2, 4], "slice": 9}, VOLUME)
    assert prompt.z_range == (9, 9) and not prompt.is_3d
    assert parse_prompt({"roi": [1, 3, 2, 4, 0, 40], "slice": 9}, VOLUME).z_range == (9, 9)


def test_box_is_clipped_to_the_image():
    prompt = parse_prompt({"roi": [-5, 500, -5, 120, 40, 90]}, VOLUME)
    assert prompt.box_xyxy == (0, 0, 191, 120)
    assert prompt.z_range == (40, 47)


def test_clicks_without_a_box_propagate_from_the_last_foreground_click():
    prompt = parse_prompt({"foreground": [[5, 6, 3], [7, 8, 4]], "background": [[11, 12, 4], [1, 1, 9]]}, VOLUME)
    assert prompt.box_xyxy is None and prompt.slice_index == 4
    assert prompt.is_3d and prompt.z_range == (0, 47)
    assert prompt.foreground == ((7.0, 8.0),) and prompt.background == ((11.0, 12.0),)
    flat = parse_prompt({"foreground": [[5, 6, 3]]}, VOLUME, propagate=False)
    assert not flat.is_3d and flat.z_range == (3, 3)


def test_ohif_vista3d_points_and_labels():
    prompt = parse_prompt({"points": [[5, 6, 3], [9, 9, 3]], "point_labels": [1, 0]}, VOLUME)
    assert prompt.foreground == ((5.0, 6.0),) and prompt.background == ((9.0, 9.0),)


def test_clicks_with_a_3d_box_keep_their_own_slices_in_order():
    params = {"roi": [1, 30, 2, 40, 5, 25], "foreground": [[10, 10, 8], [12, 12, 30]], "background": [[11, 11, 20]]}
    prompt = parse_prompt(params, VOLUME)
    assert prompt.is_3d and prompt.z_range == (5, 25) and prompt.box_slices == (5, 25)
    # every click acts on its slice, the one outside the box's slices too (it widens the range)
    assert prompt.clicks == ((10.0, 10.0, 8, True), (12.0, 12.0, 30, True), (11.0, 11.0, 20, False))


def test_ohif_points_keep_the_order_they_were_placed_in():
    prompt = parse_prompt({"points": [[5, 6, 3], [9, 9, 7], [4, 4, 9]], "point_labels": [1, 0, 1]}, VOLUME)
    assert [click[2:] for click in prompt.clicks] == [(3, True), (7, False), (9, True)]


def test_too_many_clicks_on_a_volume_is_a_422_not_a_500():
    clicks = [[5, 6, z % 48] for z in range(MAX_VOLUME_CLICKS + 1)]
    with pytest.raises(RequestError, match=f"at most {MAX_VOLUME_CLICKS} clicks per structure"):
        parse_prompt({"roi": [1, 30, 2, 40, 5, 25], "foreground": clicks}, VOLUME)
    flat = parse_prompt({"roi": [1, 30, 2, 40], "slice": 3, "foreground": clicks}, VOLUME)  # one slice: no replay
    assert not flat.is_3d and len(flat.foreground) == 3


def test_points_on_the_predicted_slice_only():
    prompt = parse_prompt(
        {"roi": [1, 30, 2, 40], "slice": 3, "foreground": [[5, 6, 3], [7, 8, 4], [9, 10]], "background": [[11, 12, 3]]},
        VOLUME,
    )
    assert prompt.foreground == ((5.0, 6.0), (9.0, 10.0))
    assert prompt.background == ((11.0, 12.0),)


def test_picture_takes_a_4_number_roi():
    prompt = parse_prompt({"roi": [1, 30, 2, 40]}, (256, 200))
    assert prompt.box_xyxy == (1, 2, 30, 40) and prompt.z_range == (0, 0) and not prompt.is_3d


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"roi": [200, 300, 0, 10, 0, 0]}, "outside the image along i"),
        ({"roi": [0, 10, 0, 10, 60, 70]}, "outside the image along k"),
        ({"roi": [0, 0, 10]}, "roi must have 6"),
        ({"roi": [0, 0, 10, "a"]}, "list of numbers"),
        ({"roi": [0, 10, 0, float("nan"), 0, 1]}, "finite"),
        ({"roi": [0, 10, 0, 10]}, "needs `slice`"),
        ({"roi": [0, 10, 0, 10], "slice": 48}, "slice 48 is outside"),
        ({"roi": [0, 10, 0, 10], "slice": "top"}, "slice must be an integer"),
        ({"roi": [0, 10, 0, 10, 1, 1], "foreground": [[1]]}, "must be [i, j] or [i, j, k]"),
        ({"roi": [0, 10, 0, 10, 1, 1], "background": [[5, 170, 1]]}, "background point [5.0, 170.0, 1.0] is outside"),
        ({"foreground": [[5, 6, 60]]}, "outside the image"),
        ({"foreground": [[5, 6]]}, "need [i, j, k]"),
        ({"background": [[5, 6, 1]]}, "background clicks alone"),
        ({}, "a prompt is required"),
        ({"points": [[1, 2, 3]], "point_labels": [1, 1]}, "point_labels has 2 values"),
        ({"points": [[1, 2, 3]], "point_labels": [2]}, "point_labels must be 1"),
        ({"foreground": [[1, 2, 3]] * 1001}, "at most 1000"),
    ],
)
def test_bad_prompt_is_422(params, message):
    with pytest.raises(RequestError) as info:
        parse_prompt(params, VOLUME)
    assert info.value.status_code == 422
    assert message in info.value.detail


def test_required_fields():
    check_required({"foreground": [[1, 2, 3]]})  # no label, no roi: fine
    with pytest.raises(RequestError) as info:
        check_required({"label": "liver"})
    assert "a prompt is required" in info.value.detail


@pytest.mark.parametrize(
    ("params", "expected"),
    [({"label": " liver "}, "liver"), ({"label": "renal cyst"}, "renal cyst"), ({"label_prompt": [2]}, "spleen"),
     ({"label_prompt": 1}, "liver"), ({}, "default"), ({"label": "Segment_1"}, "default"), ({"label": ""}, "default")],
)
def test_label_from_slicer_ohif_or_the_default(params, expected):
    assert parse_label(params, LABELS, default="default") == expected


def test_unknown_label_prompt_is_422():
    with pytest.raises(RequestError) as info:
        parse_label({"label_prompt": [7]}, LABELS)
    assert "1=liver, 2=spleen" in info.value.detail


@pytest.mark.parametrize("label", ["x" * 129, "liver\x00", "liver\nspleen"])
def test_a_label_name_is_short_and_printable(label):
    # a new name is kept in model/extra_labels.json: a hostile client must not grow it by megabytes
    with pytest.raises(RequestError, match="printable structure name of at most 128"):
        parse_label({"label": label}, LABELS)
