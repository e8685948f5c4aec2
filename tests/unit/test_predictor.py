"""medsegx.predictor (embedding cache, 2D predict, clicks) and the ``medsegx`` CLI (3D: test_propagation.py).

Two models keep this fast: the tiny random ``tiny_vit`` for the cache and output contract, and the
real LiteMedSAM weights (``build_model("lite")``, built once per module) for accuracy and the CLI.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegx.build import build_model, count_parameters
from medsegx.cli import main as cli_main
from medsegx.metrics import dice
from medsegx.predictor import Prediction, Predictor, context_indices
from medsegx.taxonomy import resolve
from medsegx.transforms import mask_from_model, prepare_intensity, prepare_volume, resize_info

REPO = Path(__file__).resolve().parents[2]
LIVER = resolve("liver", "CT")
SPLEEN = resolve("spleen", "CT")


# ----------------------------------------------------------------------------- helpers


def disk(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return cols.min() - pad, rows.min() - pad, cols.max() + pad, rows.max() + pad


def ct_phantom(shape: tuple[int, int], organ: np.ndarray, seed: int = 0) -> np.ndarray:
    """HU slice: air, a soft-tissue body ellipse, a brighter (contrast-enhanced) organ, noise."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    body = ((rows - shape[0] / 2) / (0.45 * shape[0])) ** 2 + ((cols - shape[1] / 2) / (0.46 * shape[1])) ** 2 <= 1
    hu = np.where(body, 0.0, -1000.0)
    hu[organ] = 150.0
    return hu + np.random.default_rng(seed).normal(0.0, 10.0, hu.shape)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny_vit", pretrained=False)


@pytest.fixture(scope="module")
def lite_model():
    return build_model("lite")


def with_context_weights(model, adapters: bool):
    """A copy of ``model`` with random context tables and gates; random Up layers when ``adapters``
    (a fine-tuned model), zero Up layers otherwise (inert adapters: the label changes only the gates)."""
    import copy

    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed" in name and "adapter" not in name or "adapter_gate" in name or "organ_gate" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            elif "adapter_up" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator) if adapters else torch.zeros_like(param))
    return model


@pytest.fixture(scope="module")
def adapted_tiny(tiny_model):
    return with_context_weights(tiny_model, adapters=True)


def count_encodes(model, monkeypatch) -> list:
    calls = []
    encode = model.encode

    def counted(images, context):
        calls.append(context.tolist())
        return encode(images, context)

    monkeypatch.setattr(model, "encode", counted)
    return calls


@pytest.fixture()
def counting(tiny_model, monkeypatch):
    """tiny_vit with its encoder calls counted."""
    return tiny_model, count_encodes(tiny_model, monkeypatch)


def grey_image(seed: int = 0, shape=(300, 200)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- 2D contract


def test_prediction_contract(tiny_model):
    image = grey_image()
    result = Predictor(tiny_model).predict(image, (20, 30, 150, 250), LIVER)
    assert isinstance(result, Prediction)
    assert result.mask.shape == (300, 200) and result.mask.dtype == bool
    assert result.logits.shape == (3, 256, 256) and result.logits.dtype == np.float32
    assert result.iou.shape == (3,)
    assert result.chosen == int(np.argmax(result.iou)) and result.score == pytest.approx(result.iou[result.chosen])
    chosen = result.logits[result.chosen]
    assert result.stability == pytest.approx((chosen > 1).sum() / max((chosen > -1).sum(), 1))
    blocks = len(tiny_model.conmoae_blocks)
    assert result.expert_gates.shape == (blocks, 4)
    assert np.allclose(result.expert_gates.sum(axis=-1), 1.0, atol=1e-5)
    assert result.box_model == pytest.approx(np.array([20, 30, 150, 250]) * 256 / 300)
    assert not result.cache_hit and result.encode_ms > 0 and result.decode_ms > 0
    assert set(result.timings) >= {"encode_ms", "decode_ms", "cache_hit", "total_ms"}
    # the mask is the chosen logits resized to the original frame
    assert np.array_equal(result.mask, mask_from_model(result.logits[result.chosen], resize_info(300, 200)))


def test_second_box_on_same_slice_hits_cache(counting):
    model, calls = counting
    predictor = Predictor(model)
    image = grey_image()
    first = predictor.predict(image, (20, 30, 150, 250), LIVER, key="case-1")
    second = predictor.predict(image, (60, 60, 120, 120), LIVER, key="case-1")
    assert len(calls) == 1
    assert not first.cache_hit and second.cache_hit and second.encode_ms == 0.0
    stats = predictor.cache_stats
    assert (stats.hits, stats.misses, stats.size, stats.capacity) == (1, 1, 1, 8)
    assert not np.allclose(first.logits, second.logits)
    assert np.array_equal(first.expert_gates, second.expert_gates)


def test_cache_key_from_pixels_context_and_slice(adapted_tiny, monkeypatch):
    model, calls = adapted_tiny, count_encodes(adapted_tiny, monkeypatch)
    predictor = Predictor(model)
    image = grey_image()
    predictor.predict(image, (20, 30, 150, 250), LIVER)
    assert predictor.predict(image.copy(), (20, 30, 150, 250), LIVER).cache_hit  # same bytes
    changed = image.copy()
    changed[0, 0] += 1
    assert not predictor.predict(changed, (20, 30, 150, 250), LIVER).cache_hit
    assert not predictor.predict(image, (20, 30, 150, 250), SPLEEN).cache_hit  # context conditions the encoder
    assert calls[-1] == [list(SPLEEN.indices)]
    assert predictor.predict(image, (20, 30, 150, 250), SPLEEN.indices).cache_hit  # 5-tuple == TaskContext
    assert not predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=3).cache_hit
    assert not predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=4).cache_hit
    assert predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=3).cache_hit
    assert predictor.cache_stats.misses == len(calls) == 5


def test_label_switch_with_inert_adapters_costs_the_decoder_only(tiny_model, monkeypatch):
    """Zero Up layers: the embedding ignores the context, so another label reuses it; the gates
    reported are those of the new label, as a fresh encoder pass gives them."""
    model = with_context_weights(tiny_model, adapters=False)
    calls = count_encodes(model, monkeypatch)
    predictor = Predictor(model)
    image = grey_image()
    predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=2)
    switched = predictor.predict(image, (20, 30, 150, 250), SPLEEN, key="vol", slice_index=2)
    assert switched.cache_hit and len(calls) == 1
    fresh = Predictor(model, cache_size=0).predict(image, (20, 30, 150, 250), SPLEEN)
    assert np.allclose(switched.logits, fresh.logits, atol=1e-5)
    assert np.allclose(switched.expert_gates, fresh.expert_gates, atol=1e-5)
    liver_gates = predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=2).expert_gates
    assert not np.allclose(liver_gates, switched.expert_gates, atol=1e-3)  # the label does move the gates

    with torch.no_grad():  # new gate weights (adapters still inert): the next switch follows them
        for block in model.conmoae_blocks:
            block.adapter_gate.weight.mul_(3.0)
    predictor.clear_cache()  # as the app does when it publishes weights
    predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=2)
    switched_again = predictor.predict(image, (20, 30, 150, 250), SPLEEN, key="vol", slice_index=2)
    fresh = Predictor(model, cache_size=0).predict(image, (20, 30, 150, 250), SPLEEN)
    assert switched_again.cache_hit
    assert np.allclose(switched_again.expert_gates, fresh.expert_gates, atol=1e-5)
    assert not np.allclose(switched_again.expert_gates, switched.expert_gates, atol=1e-3)


def test_label_switch_after_fine_tuning_encodes_again(adapted_tiny, monkeypatch):
    calls = count_encodes(adapted_tiny, monkeypatch)
    predictor = Predictor(adapted_tiny)
    image = grey_image()
    liver = predictor.predict(image, (20, 30, 150, 250), LIVER, key="vol", slice_index=2)
    spleen = predictor.predict(image, (20, 30, 150, 250), SPLEEN, key="vol", slice_index=2)
    assert not spleen.cache_hit and len(calls) == 2
    assert not np.allclose(liver.logits, spleen.logits, atol=1e-4)  # the context changed the embedding


def test_lru_eviction_and_clear(counting):
    model, calls = counting
    predictor = Predictor(model, cache_size=2)
    image = grey_image()
    for key in ("a", "b", "a", "c"):  # "a" was used after "b": "b" is evicted
        predictor.predict(image, (20, 30, 150, 250), LIVER, key=key)
    assert predictor.cache_stats.size == 2
    assert predictor.predict(image, (20, 30, 150, 250), LIVER, key="a").cache_hit
    assert not predictor.predict(image, (20, 30, 150, 250), LIVER, key="b").cache_hit
    predictor.clear_cache()
    assert predictor.cache_stats == type(predictor.cache_stats)(0, 0, 0, 2)
    assert not Predictor(model, cache_size=0).predict(image, (0, 0, 10, 10), LIVER, key="a").cache_hit


def test_points_select_and_oracle(tiny_model):
    predictor = Predictor(tiny_model)
    image = grey_image()
    box_only = predictor.predict(image, (20, 30, 150, 250), LIVER, key="k")
    with_points = predictor.predict(image, (20, 30, 150, 250), LIVER, key="k", points=[[80, 100, 1], [30, 40, 0]])
    assert with_points.cache_hit and not np.allclose(box_only.logits, with_points.logits)
    fixed = predictor.predict(image, (20, 30, 150, 250), LIVER, key="k", select=1)
    assert fixed.chosen == 1 and np.allclose(fixed.logits, box_only.logits)
    gt = np.zeros((300, 200), dtype=bool)
    gt[30:250, 20:150] = True
    oracle = predictor.predict(image, (20, 30, 150, 250), LIVER, key="k", select="oracle", gt=gt)
    scores = [dice(m, gt) for m in mask_from_model(oracle.logits, resize_info(300, 200))]
    assert oracle.chosen == int(np.argmax(scores))


def test_predict_is_thread_safe(tiny_model):
    predictor = Predictor(tiny_model, cache_size=1)  # force re-encoding while threads interleave
    images = [grey_image(seed) for seed in range(2)]
    contexts = [LIVER, SPLEEN]
    expected = {(i, c): predictor.predict(images[i], (20, 30, 150, 250), contexts[c]).logits
                for i in range(2) for c in range(2)}
    errors: list[str] = []

    def worker(offset: int) -> None:
        for step in range(3):
            i, c = (offset + step) % 2, (offset // 2 + step) % 2
            logits = predictor.predict(images[i], (20, 30, 150, 250), contexts[c]).logits
            if not np.allclose(logits, expected[(i, c)], atol=1e-5):
                errors.append(f"thread {offset} step {step}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize(
    ("image", "box", "context", "kwargs", "message"),
    [
        (grey_image(), (250, 10, 260, 20), LIVER, {}, r"box \(250, 10, 260, 20\).*200 x 300.*outside"),
        (grey_image(), (50, 10, 40, 20), LIVER, {}, r"box \(50, 10, 40, 20\).*inverted"),
        (grey_image().astype(np.float32), (0, 0, 5, 5), LIVER, {}, "uint8.*prepare_intensity.*float32"),
        (np.zeros((2, 4, 4, 3), np.uint8), (0, 0, 1, 1), LIVER, {}, r"\(H, W\) or \(H, W, 3\), got shape \(2, 4, 4, 3\)"),
        (grey_image(), (0, 0, 5, 5), (1, 2, 3), {}, "context must be a TaskContext or 5 integers"),
        (grey_image(), (0, 0, 5, 5), LIVER, {"select": "best"}, "select must be one of box_fit, iou, oracle"),
        (grey_image(), (0, 0, 5, 5), LIVER, {"select": "oracle"}, "needs gt"),
        (grey_image(), (0, 0, 5, 5), LIVER, {"points": [[1, 1, 2]]}, "labels must be 1 .* or 0"),
        (grey_image(), (0, 0, 5, 5), LIVER, {"points": [[1, 400, 1]]}, r"point \(1.0, 400.0\).*outside"),
    ],
)
def test_bad_inputs_raise_value_error(tiny_model, image, box, context, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Predictor(tiny_model).predict(image, box, context, **kwargs)


def test_context_indices():
    assert context_indices(LIVER) == LIVER.indices
    assert context_indices(np.array(LIVER.indices)) == LIVER.indices
    with pytest.raises(ValueError, match="5 integers"):
        context_indices((1.5, 0, 0, 0, 0))


# ----------------------------------------------------------------------------- real weights


def test_lite_segments_a_ct_organ_in_a_portrait_slice(lite_model):
    shape = (384, 256)
    organ = disk(shape, (150, 110), 40) | disk(shape, (180, 120), 35)
    image = prepare_intensity(ct_phantom(shape, organ), "CT", LIVER)
    result = Predictor(lite_model).predict(image, bounding_box(organ, pad=4), LIVER)
    assert dice(result.mask, organ) >= 0.9
    assert result.chosen == 0 and result.score > 0.8  # LiteMedSAM's calibrated token


def test_lite_one_click_segments_the_clicked_organ(lite_model):
    shape = (384, 256)
    organ = disk(shape, (150, 110), 40) | disk(shape, (180, 120), 35)
    image = prepare_intensity(ct_phantom(shape, organ), "CT", LIVER)
    predictor = Predictor(lite_model)
    result = predictor.predict_clicks(image, [(115, 160, 1)], LIVER, key="organ")
    assert dice(result.mask, organ) >= 0.85
    assert predictor.cache_stats.misses == 1  # every candidate box reused one embedding
    points_only = predictor.predict(image, None, LIVER, points=[(115, 160, 1)], key="organ")
    assert dice(points_only.mask, organ) < dice(result.mask, organ)  # why clicks choose a box


def test_clicks_need_a_foreground_point(tiny_model):
    predictor = Predictor(tiny_model)
    with pytest.raises(ValueError, match="at least one foreground"):
        predictor.predict_clicks(grey_image(), [(10, 10, 0)], LIVER)
    with pytest.raises(ValueError, match="method must be one of"):
        predictor.predict_clicks(grey_image(), [(10, 10, 1)], LIVER, method="guess")
    with pytest.raises(ValueError, match="a box or at least one point"):
        predictor.predict(grey_image(), None, LIVER)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsegx.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modality", "PET"], r"unknown modality 'PET'; accepted .*CT.*MRI"),
        (["--box", "300", "10", "320", "20"], r"box \(300.0, 10.0, 320.0, 20.0\).*W x H = 200 x 300"),
        (["--box", "50", "10", "40", "20"], "inverted"),
        (["--box3d", "0", "0", "5", "5", "0", "1"], r"2D image of shape \(300, 200\).*need a volume"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    image = tmp_path / "slice.npy"
    np.save(image, np.zeros((300, 200), dtype=np.float32))
    base = {"--image": str(image), "--modality": "CT", "--target": "liver", "--out": str(tmp_path / "m.npy")}
    argv = ["predict"]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    if "--box" not in args and "--box3d" not in args:
        argv += ["--box", "10", "10", "50", "50"]
    assert cli_main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsegx: error:") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "m.npy").exists()


def test_cli_missing_file_and_volume_without_slice(tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    assert cli_main(["predict", "--image", str(missing), "--box", "0", "0", "5", "5", "--modality", "CT",
                     "--target", "liver", "--out", str(tmp_path / "m.npy")]) == 2
    assert f"image not found: {missing}" in capsys.readouterr().err
    volume = tmp_path / "vol.npy"
    np.save(volume, np.zeros((5, 4, 4), dtype=np.float32))
    assert cli_main(["predict", "--image", str(volume), "--box", "0", "0", "3", "3", "--modality", "CT",
                     "--target", "liver", "--out", str(tmp_path / "m.npy"), "--slice", "7"]) == 2
    assert "--slice 7 is outside the volume (valid 0..4)" in capsys.readouterr().err


def test_cli_predict_npy_with_points(tmp_path):
    shape = (384, 256)
    organ = disk(shape, (150, 110), 40)
    np.save(tmp_path / "slice.npy", ct_phantom(shape, organ).astype(np.float32))
    x0, y0, x1, y1 = bounding_box(organ, pad=4)
    done = run_cli("predict", "--image", str(tmp_path / "slice.npy"), "--box", *map(str, (x0, y0, x1, y1)),
                   "--modality", "CT", "--target", "liver", "--points", "110", "150", "1",
                   "--out", str(tmp_path / "mask.npy"), "--logits-out", str(tmp_path / "logits.npy"))
    assert done.returncode == 0, done.stderr
    mask = np.load(tmp_path / "mask.npy")
    assert mask.shape == shape and mask.dtype == np.uint8 and dice(mask, organ) >= 0.9
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (3, 256, 256) and logits.dtype == np.float32
    assert "CT > body > abdomen > liver > Liver" in done.stdout


def test_cli_predict_nifti_box3d_keeps_ijk_orientation(tmp_path):
    # [i, j, k] volume, i (x) = 96, j (y) = 128, 5 slices; the organ is elongated along j
    i, j, k = np.ogrid[:96, :128, :5]
    organ = ((i - 40) / 18.0) ** 2 + ((j - 70) / 30.0) ** 2 + ((k - 2) / 4.0) ** 2 <= 1
    body = ((i - 48) / 44.0) ** 2 + ((j - 64) / 60.0) ** 2 <= 1
    hu = (np.where(body, 0.0, -1000.0) + np.zeros((1, 1, 5))).astype(np.float32)
    hu[organ] = 150.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "ct.nii.gz"))
    ii, jj, _ = np.nonzero(organ)
    box3d = (ii.min() - 3, jj.min() - 3, ii.max() + 3, jj.max() + 3, 2, 3)  # x = i, y = j; 2 slices
    done = run_cli("predict", "--image", str(tmp_path / "ct.nii.gz"), "--box3d", *map(str, box3d),
                   "--modality", "CT", "--target", "liver", "--out", str(tmp_path / "mask.nii.gz"),
                   "--logits-out", str(tmp_path / "logits.npy"))
    assert done.returncode == 0, done.stderr
    written = nib.load(str(tmp_path / "mask.nii.gz"))
    mask = np.asarray(written.dataobj)
    assert mask.shape == (96, 128, 5) and np.allclose(written.affine, affine)
    assert dice(mask[:, :, 2:4], organ[:, :, 2:4]) >= 0.85
    assert not mask[:, :, [0, 1, 4]].any()
    assert np.load(tmp_path / "logits.npy").shape == (3, 256, 256)


def test_cli_info_prints_counts(lite_model):
    done = run_cli("info")
    assert done.returncode == 0, done.stderr
    total, trainable = count_parameters(lite_model)
    assert "backbone: lite" in done.stdout
    assert f"parameters: total {total:,}, trainable {trainable:,}" in done.stdout
    assert "weights backbone:" in done.stdout and "taxonomy version:" in done.stdout


def write_dicom_series(folder: Path, volume_hu: np.ndarray, order: list[int]) -> None:
    """One CT file per slice, written in ``order`` (so file order != slice order)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    for index in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = FileDataset(str(folder / f"f{index}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.Modality = "CT"
        dataset.Rows, dataset.Columns = volume_hu.shape[1:]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * index]  # slice index = position order
        dataset.InstanceNumber = len(order) - index
        dataset.RescaleSlope, dataset.RescaleIntercept = 2, -1024
        dataset.BitsAllocated = dataset.BitsStored = 16
        dataset.HighBit, dataset.PixelRepresentation, dataset.SamplesPerPixel = 15, 0, 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.PixelData = ((volume_hu[index] + 1024) / 2).astype(np.uint16).tobytes()
        dataset.is_little_endian, dataset.is_implicit_VR = True, False  # pydicom 2.x encoding flags
        dataset.save_as(str(folder / f"f{index}.dcm"), write_like_original=False)
    (folder / "README.txt").write_text("not DICOM")


def test_cli_loads_dicom_series_png_and_npy(tmp_path):
    from PIL import Image

    from medsegx.cli import load_image

    volume_hu = np.stack([np.full((8, 6), 10.0 * z) for z in range(4)])
    volume_hu[:, 0, 5] = -1000.0
    write_dicom_series(tmp_path / "series", volume_hu, order=[2, 0, 3, 1])
    loaded = load_image(tmp_path / "series", want_volume=True)
    assert loaded.is_volume and loaded.dicom_modality == "CT"
    assert np.array_equal(loaded.array, volume_hu)  # sorted along the normal, slope/intercept applied

    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(load_image(tmp_path / "frame.png", False).array, rgb)
    assert load_image(tmp_path / "grey.png", False).array.shape == (10, 12)
    np.save(tmp_path / "three.npy", np.zeros((3, 10, 12)))
    assert load_image(tmp_path / "three.npy", want_volume=True).is_volume
    with pytest.raises(ValueError, match="unknown image format '.txt'"):
        load_image(tmp_path / "series" / "README.txt", False)


def test_prefetch_fills_the_cache_and_stops_when_asked():
    """``Predictor.prefetch``: uncached slices only, never more than the cache, ``stop`` honoured at once."""
    predictor = Predictor(build_model("tiny_lite"), cache_size=4)
    volume = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    context = LIVER
    assert predictor.prefetch(volume, [1, 2], context, key="v") == 2
    assert predictor.prefetch(volume, [2, 3, -1, 99], context, key="v") == 1  # 2 cached; out of range skipped
    assert predictor.cache_stats.size == 3 and predictor.cache_stats.misses == 0
    assert predictor.prefetch(volume, range(8), context, key="v", stop=lambda: True) == 0
    assert predictor.prefetch(volume, range(8), context, key="w") == 4  # bounded by the cache
    hit = predictor.predict(volume[3], (4, 4, 20, 20), context, key="w", slice_index=3)
    assert hit.cache_hit
