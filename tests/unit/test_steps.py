"""The shared fine-tuning blocks: slice sampling (medsegx.slices), items and box jitter (medsegx.items),
train/val steps (medsegx.steps), mask uncertainty (medsegx.metrics), publishing (medsegx.checkpoint)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from medsegx.build import build_model
from medsegx.checkpoint import load_checkpoint, previous_checkpoint_path, publish_checkpoint
from medsegx.items import item_from_arrays, jitter_box, mask_box
from medsegx.metrics import dice, mask_uncertainty
from medsegx.predictor import Predictor, box_fit_choice
from medsegx.slices import StructureBalancedSampler, evenly_spaced, structure_slices
from medsegx.steps import EncoderMemo, build_optimizer, set_train_mode, train_step, val_step
from medsegx.taxonomy import resolve
from medsegx.transforms import box_to_model, mask_from_model, resize_info, to_model_input

LIVER_CT = resolve("liver", "CT").indices


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny_vit", pretrained=False)


def _slice(height=40, width=60, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[10:20, 15:40] = True
    return image, mask


# ----------------------------------------------------------------------------- samples


def test_structure_slices_split_per_value_with_min_pixels():
    labels = np.zeros((4, 10, 10), dtype=np.float32)  # LoadImage returns float labels
    labels[0, :4, :4] = 1  # 16 px
    labels[1, :2, :2] = 1  # 4 px: too small
    labels[2, 5:, 5:] = 2
    labels[3, 0, 0] = 3  # only tiny slices
    found = structure_slices(labels, min_pixels=10)
    assert sorted(found) == [1, 2, 3]
    assert found[1].tolist() == [0]
    assert found[2].tolist() == [2]
    assert found[3].tolist() == []
    assert structure_slices(np.zeros((2, 5, 5))) == {}


def test_structure_slices_rejects_non_label_arrays():
    with pytest.raises(ValueError, match="non-integer"):
        structure_slices(np.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="negative"):
        structure_slices(np.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="Z, H, W"):
        structure_slices(np.zeros((4, 4)))


def test_evenly_spaced():
    assert evenly_spaced(range(10), 3) == [0, 4, 9]
    assert evenly_spaced(range(10), 2, ends=False) == [2, 7]  # not the two tips of the structure
    assert evenly_spaced(range(10), 4, ends=False) == [1, 3, 6, 8]
    assert evenly_spaced([3, 4], 5) == [3, 4]
    assert evenly_spaced(range(9), 1) == evenly_spaced(range(9), 1, ends=False) == [4]


def test_item_uses_the_predictor_transform(tiny_model):
    image, mask = _slice()
    item = item_from_arrays(image, mask, LIVER_CT, tiny_model.normalize)
    expected, info = to_model_input(np.repeat(image[..., None], 3, axis=-1), tiny_model.normalize)
    assert torch.equal(item["image"], expected[0])
    assert item["label"].shape == (1, 256, 256)
    assert item["valid_hw"].tolist() == list(info.resized_size)
    assert item["context"].tolist() == list(LIVER_CT)
    # exact box: the mask's inclusive pixel box mapped as the predictor maps a user's box
    assert mask_box(mask) == (15, 10, 39, 19)
    assert torch.allclose(item["box"], torch.from_numpy(box_to_model((15, 10, 39, 19), info)))
    # the model-frame label maps back onto the original mask
    back = mask_from_model(item["label"][0] * 20 - 10, info)
    assert dice(back, mask) > 0.95


def test_item_rejects_empty_mask(tiny_model):
    image, _ = _slice()
    with pytest.raises(ValueError, match="empty"):
        item_from_arrays(image, np.zeros_like(image, dtype=bool), LIVER_CT, tiny_model.normalize)


def test_jitter_box_pushes_out_0_to_19_px_and_clips():
    box = torch.tensor([50.0, 60.0, 100.0, 120.0])
    generator = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(300):
        jittered = jitter_box(box, (256, 200), generator=generator)
        deltas.append((box - jittered) * torch.tensor([1.0, 1.0, -1.0, -1.0]))
    deltas = torch.stack(deltas)
    assert deltas.min() == 0 and deltas.max() == 19
    near_edge = jitter_box(torch.tensor([2.0, 2.0, 195.0, 250.0]), (256, 200), generator=generator)
    assert near_edge.min() >= 0 and near_edge[2] <= 199 and near_edge[3] <= 255
    assert torch.equal(jitter_box(box, (256, 256), max_shift=0), box)


def test_jitter_box_by_a_fraction_of_the_side_keeps_small_boxes_tight():
    # the in-loop recipe: a side moves by 0..round(fraction * extent) - 1 px, at most max_shift - 1
    generator = torch.Generator().manual_seed(0)
    box = torch.tensor([40.0, 100.0, 89.0, 119.0])  # 50 x 20 px: bounds 5 (x sides) and 2 (y sides)
    deltas = torch.stack([(box - jitter_box(box, (256, 256), generator=generator, max_fraction=0.1))
                          * torch.tensor([1.0, 1.0, -1.0, -1.0]) for _ in range(400)])
    assert deltas.min() == 0
    assert deltas[:, [0, 2]].max() == 4 and deltas[:, [1, 3]].max() == 1
    assert torch.equal(deltas, deltas.round())
    tiny = torch.tensor([70.0, 101.0, 73.0, 104.0])  # 4 x 4 px: bound 1, the box stays exact
    assert all(torch.equal(jitter_box(tiny, (256, 256), generator=generator, max_fraction=0.1), tiny)
               for _ in range(50))
    inner = torch.tensor([100.0, 100.0, 219.0, 219.0])  # 120 px: bound 12, under the cap
    shifts = torch.stack([jitter_box(inner, (256, 256), generator=generator, max_fraction=0.5, max_shift=8) - inner
                          for _ in range(400)])
    assert shifts[:, 2:].max() == 7 and shifts[:, :2].min() == -7  # the cap wins over half the side


def test_sampler_caps_each_structure_and_redraws_per_epoch():
    structures = ["a"] * 10 + ["b"] * 3 + ["c"] * 1
    sampler = StructureBalancedSampler(structures, max_per_structure=4, seed=1)
    assert len(sampler) == 4 + 3 + 1
    epochs = [list(sampler) for _ in range(3)]
    for drawn in epochs:
        counts = {key: sum(structures[i] == key for i in drawn) for key in "abc"}
        assert counts == {"a": 4, "b": 3, "c": 1}
        assert len(set(drawn)) == len(drawn)
    assert len({tuple(sorted(d)) for d in epochs}) > 1  # a new subset of "a" each epoch
    fixed = StructureBalancedSampler(structures, max_per_structure=2, shuffle=False)
    assert list(fixed) == list(fixed) == [2, 7, 10, 12, 13]


# ----------------------------------------------------------------------------- steps


def _batch(model, seed=0):
    image, mask = _slice(seed=seed)
    item = item_from_arrays(image, mask, LIVER_CT, model.normalize)
    return {key: value[None] for key, value in item.items()}


def test_finetune_mode_trains_only_what_is_trained(tiny_model):
    set_train_mode(tiny_model)
    assert tiny_model.mask_decoder.training
    assert not tiny_model.image_encoder.training and not tiny_model.prompt_encoder.training
    assert all(block.training and not block.mlp.training for block in tiny_model.conmoae_blocks)


def test_train_step_moves_adapters_embeddings_and_decoder_only():
    torch.manual_seed(0)
    model = build_model("tiny_vit", pretrained=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, _ in model.named_trainable_parameters()}
    optimizer = build_optimizer(model, lr=1e-3)
    batch = _batch(model)
    outputs = [train_step(model, batch, optimizer) for _ in range(2)]
    for output in outputs:
        assert math.isfinite(output["loss"].item())
        assert output["pred"].shape == (1, 1, 256, 256) and 0 <= int(output["mask_index"]) <= 2
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable
    assert any(".adapter_up." in name for name in changed)  # gradients reach the adapters through the encoder
    assert any(name.startswith("mask_decoder.") for name in changed)
    # the second step reaches the context embedding row of the sample's modality, not the others
    modality_rows = model.image_encoder.modal_embed.weight - before["image_encoder.modal_embed.weight"]
    assert modality_rows[LIVER_CT[0]].abs().sum() > 0
    assert modality_rows[[i for i in range(modality_rows.shape[0]) if i != LIVER_CT[0]]].abs().sum() == 0


def test_val_step_reports_the_mask_the_predictor_returns(tiny_model):
    """Validation scores the served choice (``Predictor.predict``'s ``select="box_fit"``) on the
    same pixels and box; the IoU choice and the oracle are reported beside it."""
    image, mask = _slice(seed=1)
    batch = _batch(tiny_model, seed=1)
    output = val_step(tiny_model, batch)
    served = Predictor(tiny_model, cache_size=0).predict(image, mask_box(mask), LIVER_CT)
    assert int(output["chosen"]) == served.chosen
    assert float(output["dice"]) == pytest.approx(
        dice((served.logits[served.chosen] > 0), batch["label"][0, 0].numpy() > 0.5), abs=1e-2)  # float16 cache
    logits, iou, _ = tiny_model.eval()(batch["image"], batch["box"], batch["context"])
    by_iou = int(iou.argmax())
    assert float(output["dice_iou"]) == pytest.approx(
        dice((logits[0, by_iou] > 0).numpy(), batch["label"][0, 0].numpy() > 0.5), abs=1e-5)
    assert float(output["dice_oracle"]) >= max(float(output["dice"]), float(output["dice_iou"])) - 1e-6


def test_box_fit_overrides_a_misfitting_iou_choice():
    """The served rule on crafted logits: the IoU favourite's mask fills half the box, another fits it."""
    logits = np.full((3, 256, 256), -5.0, dtype=np.float32)
    logits[0, 40:60, 40:50] = 5.0  # the IoU favourite: half the box
    logits[1, 40:60, 40:60] = 5.0  # fits the box exactly
    logits[2, 0:200, 0:200] = 5.0
    box = np.array([40.0, 40.0, 59.0, 59.0])
    iou = np.array([0.9, 0.5, 0.1])
    assert box_fit_choice(logits, iou, box, (256, 256), 1.0) == 1
    assert box_fit_choice(logits, np.array([0.5, 0.9, 0.1]), box, (256, 256), 1.0) == 1
    logits[0, 40:60, 40:58] = 5.0  # now fits well enough (box IoU 0.9): the IoU choice stands
    assert box_fit_choice(logits, iou, box, (256, 256), 1.0) == 0


# ----------------------------------------------------------------------------- uncertainty


def test_mask_uncertainty_is_disagreement():
    agree = torch.full((3, 8, 8), 0.5)
    assert mask_uncertainty(agree) == pytest.approx(0.0, abs=1e-6)  # unsure, but all alike
    split = torch.stack([torch.ones(8, 8), torch.zeros(8, 8)])
    assert mask_uncertainty(split) == pytest.approx(math.log(2), rel=1e-3)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:2] = True
    half = torch.stack([torch.ones(8, 8), torch.ones(8, 8)])
    half[1, :4] = 0  # members disagree on the top half only
    assert mask_uncertainty(half, region) == pytest.approx(math.log(2), rel=1e-3)
    assert mask_uncertainty(half) == pytest.approx(math.log(2) / 2, rel=1e-3)


# ----------------------------------------------------------------------------- publishing


def test_publish_keeps_previous_and_loads(tmp_path, tiny_model):
    path = tmp_path / "model" / "medsegx.pth"
    first = publish_checkpoint(tiny_model, path, {"val_dice": 0.5})
    assert not previous_checkpoint_path(path).exists()
    with torch.no_grad():
        tiny_model.mask_decoder.iou_token.weight.add_(1.0)
    second = publish_checkpoint(tiny_model, path, {"val_dice": 0.6})
    assert previous_checkpoint_path(path) == tmp_path / "model" / "medsegx.prev.pth"
    fresh = build_model("tiny_vit", pretrained=False)
    assert load_checkpoint(fresh, previous_checkpoint_path(path))["model_version"] == first["model_version"]
    meta = load_checkpoint(fresh, path)
    assert meta["model_version"] == second["model_version"] != first["model_version"]
    assert meta["val_dice"] == 0.6
    assert torch.equal(fresh.mask_decoder.iou_token.weight, tiny_model.mask_decoder.iou_token.weight)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "optimizer", "epoch", "metadata"}  # official layout + metadata
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_failed_publish_leaves_served_file(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "medsegx.pth"
    publish_checkpoint(tiny_model, path)
    served = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        publish_checkpoint(tiny_model, path)
    assert path.read_bytes() == served
    assert previous_checkpoint_path(path).read_bytes() == served
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resize_info_matches_item(tiny_model):
    image, mask = _slice(height=300, width=120)
    item = item_from_arrays(image, mask, LIVER_CT, tiny_model.normalize)
    info = resize_info(300, 120)
    assert item["valid_hw"].tolist() == list(info.resized_size)
    assert item["label"][0, :, info.resized_size[1]:].sum() == 0  # padding stays background


def test_encoder_memo_gives_the_same_steps_with_one_encoder_pass_per_slice():
    """A frozen-encoder round (the in-loop default) encodes each slice once; the steps are unchanged."""
    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    model.tune_decoder_for([LIVER_CT])
    twin = copy.deepcopy(model)
    items = [item_from_arrays(*_slice(seed=seed), LIVER_CT, model.normalize) for seed in (0, 1)]
    memo, plain = EncoderMemo(), None
    for step in range(4):
        item = items[step % 2]
        batch = {key: value[None] for key, value in item.items()}
        ours = train_step(model, batch, build_optimizer(model, lr=1e-3), memo=memo)
        reference = train_step(twin, batch, build_optimizer(twin, lr=1e-3), memo=plain)
        assert torch.allclose(ours["loss"], reference["loss"], atol=1e-5), step
    assert (memo.misses, memo.hits) == (2, 2)
    val = val_step(model, {key: value[None] for key, value in items[0].items()}, memo=memo)
    assert torch.allclose(val["dice"], val_step(twin, {key: value[None] for key, value in items[0].items()})["dice"])
    assert memo.hits == 3
    model.tune_decoder_for([], adapters=True)  # adapters train: the encoder changes, the memo is not used
    set_train_mode(model)
    assert not EncoderMemo.usable(model)
    train_step(model, {key: value[None] for key, value in items[0].items()}, build_optimizer(model), memo=memo)
    assert memo.hits == 3 and memo.misses == 2
