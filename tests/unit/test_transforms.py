"""medsegx.transforms: intensity preparation, longest-side resize + pad, box / mask mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsegx.taxonomy import resolve
from medsegx.transforms import (
    CT_WINDOWS,
    ResizeInfo,
    box_from_model,
    box_to_model,
    ct_window_name,
    input_transform,
    intensity_bounds,
    logits_from_model,
    mask_from_model,
    points_to_model,
    prepare_intensity,
    prepare_volume,
    resize_info,
    to_model_input,
    validate_box,
    validate_box3d,
)

SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)


def sam_normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - SAM_MEAN) / SAM_STD


# ----------------------------------------------------------------------------- intensity


@pytest.mark.parametrize(
    ("target", "window"),
    [
        ("liver", "soft_tissue"),
        (None, "soft_tissue"),
        ("lung nodule", "lung"),
        ("airway", "lung"),
        ("IntracranialHemorrhage", "brain"),
        ("hippocampus", "brain"),
        ("femur", "bone"),
        ("lumbar spine", "bone"),
        ("skeleton", "bone"),
        ("vertebra", "bone"),
    ],
)
def test_ct_window_follows_taxonomy_path(target, window):
    context = resolve(target, "CT") if target else None
    assert ct_window_name(context) == window


def test_ct_soft_tissue_window_values():
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    out = prepare_intensity(hu, "CT", "liver")
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]  # W400/L40: -160..240
    assert np.array_equal(out[..., 0], out[..., 2])  # grey repeated to 3 channels


@pytest.mark.parametrize(
    ("modality", "target", "hu", "expected"),
    [
        ("CT", "lung", [-910.0, -160.0, 590.0], [0, 128, 255]),  # W1500/L-160
        ("CT", "brain", [0.0, 40.0, 80.0], [0, 128, 255]),  # W80/L40
        ("CT", "femur", [-500.0, 400.0, 1300.0], [0, 128, 255]),  # W1800/L400
        ("CTA", "aorta", [-160.0, 40.0, 240.0], [0, 128, 255]),
        ("CBCT", "tooth", [-160.0, 40.0, 240.0], [0, 128, 255]),
    ],
)
def test_ct_windows_by_target(modality, target, hu, expected):
    out = prepare_intensity(np.array([hu]), modality, target)
    assert out[0, :, 0].tolist() == expected


def test_window_override_and_unknown_preset():
    assert intensity_bounds(np.zeros((2, 2)), "CT", "liver", window="bone") == (-500.0, 1300.0)
    assert intensity_bounds(np.zeros((2, 2)), "CT", window=(100.0, 50.0)) == (0.0, 100.0)
    with pytest.raises(ValueError, match="unknown window 'muscle'"):
        intensity_bounds(np.zeros((2, 2)), "CT", window="muscle")
    assert set(CT_WINDOWS) == {"soft_tissue", "lung", "brain", "bone"}


def test_mr_percentile_clipping_ignores_zero_background_and_outliers():
    rng = np.random.default_rng(0)
    image = np.zeros((100, 100), dtype=np.float32)
    image[20:80, 20:80] = rng.uniform(100.0, 200.0, (60, 60))
    image[50, 50] = 1e6  # one hot pixel must not squash the contrast
    out = prepare_intensity(image, "MR")[..., 0]
    low, high = np.percentile(image[image != 0], (0.5, 99.5))
    assert out[0, 0] == 0  # background stays 0
    assert out[50, 50] == 255
    tissue = out[20:80, 20:80]
    assert tissue.min() == 0 and np.percentile(tissue, 99.9) == 255
    assert 100 < np.median(tissue) < 155  # uniform 100..200 -> mid-grey, not crushed to 0
    assert intensity_bounds(image, "MRI") == pytest.approx((low, high))


@pytest.mark.parametrize("modality", ["US", "Xray", "DX"])
def test_other_grey_modalities_use_percentiles(modality):
    image = np.arange(1, 1001, dtype=np.float32).reshape(10, 100)
    out = prepare_intensity(image, modality)[..., 0]
    assert out.min() == 0 and out.max() == 255


def test_empty_grey_image_is_black():
    assert prepare_intensity(np.zeros((4, 4)), "MR").max() == 0


def test_rgb_passthrough_and_minmax():
    rgb = np.random.default_rng(1).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    assert np.array_equal(prepare_intensity(rgb, "Endos"), rgb)
    assert np.array_equal(prepare_intensity(rgb, "MR"), rgb)  # any H x W x 3 input is RGB
    in_range = rgb.astype(np.float32)
    assert np.array_equal(prepare_intensity(in_range, "Fundus"), rgb)
    wide = rgb.astype(np.float32) * 4.0 - 100.0  # out of 0..255: min-max
    out = prepare_intensity(wide, "Dermos")
    assert out.min() == 0 and out.max() == 255
    unit = rgb.astype(np.float32) / 255.0  # 0..1 floats: min-max stretches to 0..255
    assert prepare_intensity(unit, "Colonos").max() == 255


def test_volume_uses_one_mapping_for_all_slices():
    rng = np.random.default_rng(2)
    volume = rng.uniform(1.0, 100.0, (4, 16, 16)).astype(np.float32)
    volume[3] *= 10.0  # a bright slice: per-slice percentiles would change slice 0's contrast
    volume[0, 0, 0] = volume[3, 0, 0] = 50.0
    out = prepare_volume(volume, "MR")
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    assert out[0, 0, 0, 0] == out[3, 0, 0, 0]
    grey = prepare_volume(volume, "MR", channels=1)
    assert grey.shape == (4, 16, 16) and np.array_equal(grey, out[..., 0])
    ct = prepare_volume(np.full((2, 3, 3), 40.0), "CT", "liver", channels=1)
    assert np.all(ct == 128)


def test_intensity_input_errors():
    with pytest.raises(ValueError, match="unknown modality 'PETCT'.*accepted.*CT.*MRI"):
        prepare_intensity(np.zeros((4, 4)), "PETCT")
    with pytest.raises(ValueError, match=r"\(H, W\) grey or \(H, W, 3\) RGB, got shape \(2, 4, 4, 4\)"):
        prepare_intensity(np.zeros((2, 4, 4, 4)), "CT")
    with pytest.raises(ValueError, match="prepare_volume"):
        prepare_intensity(np.zeros((5, 4, 4)), "CT")
    with pytest.raises(ValueError, match=r"volume must be \(Z, H, W\)"):
        prepare_volume(np.zeros((4, 4)), "CT")
    with pytest.raises(ValueError, match="channels"):
        prepare_volume(np.zeros((2, 4, 4)), "CT", channels=2)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("size", "resized"),
    [((512, 512), (256, 256)), ((300, 200), (256, 171)), ((200, 300), (171, 256)), ((100, 50), (256, 128)),
     ((256, 256), (256, 256))],
)
def test_resize_and_pad_shapes(size, resized):
    info = resize_info(*size)
    assert info.original_size == size and info.resized_size == resized
    assert info.scale == pytest.approx(256 / max(size))
    image = np.full((*size, 3), 200, dtype=np.uint8)
    tensor, info2 = to_model_input(image, sam_normalize)
    assert info2 == info
    assert tensor.shape == (1, 3, 256, 256) and tensor.dtype == torch.float32
    height, width = resized
    expected = ((200.0 - SAM_MEAN) / SAM_STD).view(3)
    assert torch.allclose(tensor[0, :, height - 1, width - 1], expected, atol=1e-4)
    # padding is exactly 0 *after* normalisation (bottom rows, right columns)
    assert torch.count_nonzero(tensor[..., height:, :]) == 0
    assert torch.count_nonzero(tensor[..., :, width:]) == 0


def test_input_transform_is_bound_to_the_model():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def normalize(self, images):
            return images / 255.0

    image = np.full((20, 10, 3), 255, dtype=np.uint8)
    tensor, info = input_transform(Model())(image)
    assert info.resized_size == (256, 128)
    assert tensor[0, 0, 0, 0].item() == pytest.approx(1.0) and tensor[0, 0, 0, 200].item() == 0.0
    tensor_from_torch, _ = to_model_input(torch.full((3, 20, 10), 255.0), lambda x: x / 255.0)
    assert torch.equal(tensor, tensor_from_torch)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8, got shape \(20, 10\)"):
        to_model_input(np.zeros((20, 10), dtype=np.uint8), sam_normalize)


@pytest.mark.parametrize("size", [(512, 512), (300, 200), (200, 333), (97, 640)])
def test_box_round_trip_within_one_pixel(size):
    rng = np.random.default_rng(3)
    info = resize_info(*size)
    height, width = size
    for _ in range(20):
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
        box = np.array([x0, y0, x1, y1], dtype=float)
        box_256 = box_to_model(box, info)
        assert box_256.dtype == np.float32 and np.all(box_256 >= 0) and np.all(box_256 <= 256)
        assert np.all(np.abs(np.rint(box_from_model(box_256, info)) - box) <= 1)


def test_box_lands_on_the_object_in_the_model_frame():
    image = np.zeros((300, 600, 3), dtype=np.uint8)
    image[100:151, 400:501] = 255  # columns 400..500, rows 100..150
    tensor, info = to_model_input(image, lambda x: x)
    x0, y0, x1, y1 = box_to_model((400, 100, 500, 150), info)
    rows, cols = np.nonzero(tensor[0, 0].numpy() > 127)
    assert abs(cols.min() - x0) <= 1 and abs(cols.max() - x1) <= 1
    assert abs(rows.min() - y0) <= 1 and abs(rows.max() - y1) <= 1
    assert np.allclose(points_to_model([[400, 100]], info), [[x0, y0]])


def test_mask_from_model_crops_padding_and_resizes():
    info = resize_info(300, 600)  # resized (128, 256), rows 128..255 are padding
    logits = torch.full((3, 256, 256), -10.0)
    logits[:, 32:64, 64:128] = 10.0  # model rows 32..63 / scale -> 75..149, cols 64..127 -> 150..299
    logits[:, 200:, :] = 10.0  # in the padding: must be dropped
    mask = mask_from_model(logits, info)
    assert mask.shape == (3, 300, 600) and mask.dtype == bool
    rows, cols = np.nonzero(mask[0])
    extent = np.array([rows.min(), rows.max(), cols.min(), cols.max()])
    assert np.all(np.abs(extent - [75, 149, 150, 299]) <= 1)
    assert mask_from_model(logits[0], info).shape == (300, 600)


@pytest.mark.parametrize("size", [(512, 512), (512, 400), (100, 300), (120, 90), (1000, 3), (700, 1300)])
def test_mask_from_model_is_the_threshold_of_pytorch_bilinear(size):
    """The NumPy block resize gives the mask of ``logits_from_model`` (``F.interpolate``) > 0, for
    up- and downsampling; pixels may differ only where the resized logit is float rounding from 0."""
    info = resize_info(*size)
    rng = np.random.default_rng(sum(size))
    noise = rng.normal(-2.0, 1.5, (3, 256, 256)).astype(np.float32)  # scattered positive pixels
    blob = -np.abs(noise)
    blob[1, 100:140, 30:90] = 3.0  # one object
    blob[2, :3, :3] = 1.0  # touching the corner
    blob[0] = -1.0  # empty
    for logits in (noise, blob):
        resized = logits_from_model(torch.from_numpy(logits), info).numpy()
        mask = mask_from_model(logits, info)
        assert mask.shape == (3, *size) and mask.dtype == bool
        differ = mask != (resized > 0)
        assert differ.sum() <= 4 and np.all(np.abs(resized[differ]) < 1e-4)
        assert np.array_equal(mask_from_model(torch.from_numpy(logits[1]), info), mask[1])
    assert not mask_from_model(blob, info)[0].any()


def test_box_validation_messages():
    assert validate_box((-5, 10, 50, 400), (300, 200)).tolist() == [0, 10, 50, 299]
    with pytest.raises(ValueError, match=r"box \(250, 10, 260, 20\).*W x H = 200 x 300.*outside"):
        validate_box((250, 10, 260, 20), (300, 200))
    with pytest.raises(ValueError, match=r"box \(50, 10, 40, 20\).*inverted"):
        validate_box((50, 10, 40, 20), (300, 200))
    with pytest.raises(ValueError, match="4 finite numbers"):
        validate_box((1, 2, 3), (300, 200))
    with pytest.raises(ValueError, match="4 finite numbers"):
        validate_box((1, 2, np.nan, 4), (300, 200))
    with pytest.raises(ValueError, match="outside the image"):
        points_to_model([[10, 400]], resize_info(300, 200))
    box_xy, z0, z1 = validate_box3d((0, 0, 10, 10, -3, 99), (12, 300, 200))
    assert (z0, z1) == (0, 11) and box_xy.tolist() == [0, 0, 10, 10]
    with pytest.raises(ValueError, match=r"box3d .*W x H x Z = 200 x 300 x 12.*z range"):
        validate_box3d((0, 0, 10, 10, 20, 30), (12, 300, 200))
    with pytest.raises(ValueError, match="inverted"):
        validate_box3d((0, 0, 10, 10, 5, 2), (12, 300, 200))


def test_resize_info_is_a_frozen_record():
    info = resize_info(10, 20)
    assert isinstance(info, ResizeInfo)
    with pytest.raises(AttributeError):
        info.scale = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="positive"):
        resize_info(0, 20)
