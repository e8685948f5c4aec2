"""``roi`` / ``slice`` / points validation in the loaded image's voxel indices."""

import pytest
from lib.infers.prompt import RequestError, check_required, parse_prompt

VOLUME = (192, 160, 48)  # (X, Y, Z) as MONAI's LoadImage returns it


def test_3d_box_and_sorted_pairs():
    prompt = parse_prompt({"roi": [40, 30, 10, 20, 30, 5]}, VOLUME)  # a flipped axis gives x0 > x1
    assert prompt.box_xyxy == (10, 20, 40, 30)
    assert prompt.z_range == (5, 30) and prompt.is_3d


def test_2d_by_equal_z_or_slice():
    assert not parse_prompt({"roi": [1, 2, 3, 4, 7, 7]}, VOLUME).is_3d
    prompt = parse_prompt({"roi": [1, 2, 3, 4], "slice": 9}, VOLUME)
    assert prompt.z_range == (9, 9) and not prompt.is_3d
    assert parse_prompt({"roi": [1, 2, 3, 4, 0, 40], "slice": 9}, VOLUME).z_range == (9, 9)


def test_box_is_clipped_to_the_image():
    prompt = parse_prompt({"roi": [-5, -5, 500, 120, 40, 90]}, VOLUME)
    assert prompt.box_xyxy == (0, 0, 191, 120)
    assert prompt.z_range == (40, 47)


def test_points_on_the_predicted_slice_only():
    prompt = parse_prompt(
        {"roi": [1, 2, 30, 40], "slice": 3, "foreground": [[5, 6, 3], [7, 8, 4], [9, 10]], "background": [[11, 12, 3]]},
        VOLUME,
    )
    assert prompt.foreground == ((5.0, 6.0), (9.0, 10.0))
    assert prompt.background == ((11.0, 12.0),)


def test_picture_ignores_z():
    prompt = parse_prompt({"roi": [1, 2, 30, 40]}, (256, 200))
    assert prompt.z_range == (0, 0) and not prompt.is_3d


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"roi": [200, 0, 300, 10, 0, 0]}, "outside the image along x"),
        ({"roi": [0, 0, 10, 10, 60, 70]}, "outside the image along z"),
        ({"roi": [0, 0, 10]}, "roi must have 4"),
        ({"roi": [0, 0, 10, "a"]}, "list of numbers"),
        ({"roi": [0, 0, 10, float("nan"), 0, 1]}, "finite"),
        ({"roi": [0, 0, 10, 10]}, "needs `slice`"),
        ({"roi": [0, 0, 10, 10], "slice": 48}, "slice 48 is outside"),
        ({"roi": [0, 0, 10, 10], "slice": "top"}, "slice must be an integer"),
        ({"roi": [0, 0, 10, 10, 1, 1], "foreground": [[1]]}, "must be [x, y] or [x, y, z]"),
        ({"roi": [0, 0, 10, 10, 1, 1], "background": [[5, 170]]}, "background point [5, 170] is outside the image"),
    ],
)
def test_bad_prompt_is_422(params, message):
    with pytest.raises(RequestError) as info:
        parse_prompt(params, VOLUME)
    assert info.value.status_code == 422
    assert message in info.value.detail


@pytest.mark.parametrize(("params", "message"), [({"roi": [1, 2, 3, 4]}, "label is required"),
                                                 ({"label": " ", "roi": [1, 2, 3, 4]}, "label is required"),
                                                 ({"label": "liver"}, "roi is required")])
def test_required_fields(params, message):
    with pytest.raises(RequestError) as info:
        check_required(params)
    assert message in info.value.detail
