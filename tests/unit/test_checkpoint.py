"""Checkpoint formats: official SAM (1024 -> 256), LiteMedSAM, MedSegX official layout, ours."""

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from medsegx.build import build_model
from medsegx.checkpoint import (
    CheckpointError,
    MissingWeightsError,
    load_checkpoint,
    load_sam_checkpoint,
    save_checkpoint,
)
from medsegx.taxonomy import TAXONOMY_VERSION, resolve


def _context():
    return torch.tensor([resolve("Liver", "CT").indices])


def _official_tiny_sam_state(seed=0):
    """A SAM-format state dict at 1024 px for the tiny ViT config (random weights, real key names)."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                              out_chans=256, qkv_bias=True, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                              use_rel_pos=True, rel_pos_zero_init=False, window_size=4, global_attn_indexes=(1,))
    with torch.no_grad():
        encoder.pos_embed.normal_()
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    state = {}
    for prefix, module in (("image_encoder", encoder), ("prompt_encoder", prompt), ("mask_decoder", decoder)):
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return state


def test_sam_checkpoint_is_resized_to_256(tmp_path):
    state = _official_tiny_sam_state()
    path = tmp_path / "sam_tiny.pth"
    torch.save(state, path)
    model = build_model("tiny_vit", pretrained=False)
    load_sam_checkpoint(model, path)
    ours = model.state_dict()
    expected_pos = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(16, 16),
                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours["image_encoder.pos_embed"], expected_pos)
    # global block 1: (127, 16) -> (31, 16); windowed block 0 keeps its (7, 16)
    rel = state["image_encoder.blocks.1.attn.rel_pos_h"]
    expected_rel = F.interpolate(rel[None, None], size=(31, 16), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(ours["image_encoder.blocks.1.attn.rel_pos_h"], expected_rel)
    torch.testing.assert_close(ours["image_encoder.blocks.0.attn.rel_pos_w"], state["image_encoder.blocks.0.attn.rel_pos_w"])
    torch.testing.assert_close(ours["image_encoder.blocks.0.mlp.mlp.lin1.weight"], state["image_encoder.blocks.0.mlp.lin1.weight"])
    # decoder: transformer and first upscaling layers from SAM, mask tokens / hypernetworks / IoU head not
    torch.testing.assert_close(ours["mask_decoder.output_upscaling.0.weight"], state["mask_decoder.output_upscaling.0.weight"])
    torch.testing.assert_close(ours["mask_decoder.output_upscaling.3.weight"], state["mask_decoder.output_upscaling.3.weight"])
    torch.testing.assert_close(ours["mask_decoder.transformer.layers.0.mlp.lin1.weight"],
                               state["mask_decoder.transformer.layers.0.mlp.lin1.weight"])
    assert not torch.equal(ours["mask_decoder.mask_tokens.weight"], state["mask_decoder.mask_tokens.weight"])
    torch.testing.assert_close(ours["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
                               state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert model.weight_sources["backbone"] == str(path)


def test_official_medsegx_round_trip_gives_same_logits(tmp_path):
    torch.manual_seed(1)
    model = build_model("tiny_vit", pretrained=False)
    with torch.no_grad():
        for name, param in model.named_trainable_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / "medsegx_tiny.pth"
    save_checkpoint(model, path, {"training_data": {"images": 3}}, epoch=7)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "optimizer", "epoch", "metadata"}
    assert saved["epoch"] == 7
    assert saved["metadata"]["backbone"] == "tiny_vit"
    assert saved["metadata"]["taxonomy_version"] == TAXONOMY_VERSION
    assert not any(k.startswith("prompt_encoder.") or ".mlp.mlp." in k for k in saved["model"])

    # an official file has no metadata: strip it and load on top of the same frozen backbone
    official = {"model": saved["model"], "optimizer": None, "epoch": 7}
    official_path = tmp_path / "official.pth"
    torch.save(official, official_path)
    fresh = build_model("tiny_vit", pretrained=False)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in saved["model"]}, strict=False)
    assert load_checkpoint(fresh, official_path) == {}
    images = model.normalize(torch.rand(1, 3, 256, 256) * 255)
    box = torch.tensor([[40.0, 40.0, 180.0, 200.0]])
    with torch.no_grad():
        expected, _, _ = model(images, box, _context())
        got, _, _ = fresh(images, box, _context())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_lite_checkpoint_on_vit_is_one_readable_error(tmp_path):
    lite = build_model("tiny_lite", pretrained=False)
    path = tmp_path / "lite.pth"
    save_checkpoint(lite, path)
    with pytest.raises(CheckpointError, match="trained on backbone 'tiny_lite', the model is 'tiny_vit'"):
        build_model("tiny_vit", pretrained=False, checkpoint=path)
    # without metadata the key comparison names what differs
    data = torch.load(path, weights_only=True)
    del data["metadata"]
    torch.save(data, path)
    with pytest.raises(CheckpointError) as info:
        build_model("tiny_vit", pretrained=False, checkpoint=path)
    message = str(info.value)
    assert str(path) in message and "'tiny_vit'" in message and "missing" in message and "unexpected" in message
    assert "\n" not in message


def test_wrong_sam_size_names_both_backbones(tmp_path):
    state = _official_tiny_sam_state()
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(1024, 3, 16, 16)  # a ViT-L width
    path = tmp_path / "sam_vit_l.pth"
    torch.save(state, path)
    model = build_model("vit_b", pretrained=False)
    with pytest.raises(CheckpointError, match=r"SAM vit_l checkpoint .* expected backbone 'vit_b'"):
        load_sam_checkpoint(model, path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"sam_vit_b_01ec64\.pth.*dl\.fbaipublicfiles\.com"):
        build_model("vit_b", sam_checkpoint=tmp_path / "sam_vit_b_01ec64.pth")
    with pytest.raises(ValueError, match="needs the official SAM weights"):
        build_model("vit_b")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_model("tiny_vit", pretrained=False, checkpoint=corrupt)
    not_medsegx = tmp_path / "flat.pth"
    torch.save({"a": torch.zeros(1)}, not_medsegx)
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' entry"):
        build_model("tiny_vit", pretrained=False, checkpoint=not_medsegx)
    with pytest.raises(ValueError, match="unknown backbone 'vit_x'"):
        build_model("vit_x")


def test_save_is_atomic_and_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    model = build_model("tiny_lite", pretrained=False)
    path = tmp_path / "model.pth"
    first = save_checkpoint(model, path)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["metadata"]["model_version"] == first["model_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_embedded_lite_weights_load_without_network():
    model = build_model("lite")
    assert "LiteMedSAM" in model.weight_sources["backbone"]
    assert model.output_mask_tokens == [0, 1, 2]


def test_tuned_decoder_round_trip_and_official_layout(tmp_path):
    """Ours may hold a tuned decoder and its contexts; loading one adds it, loading a file without one drops it."""
    torch.manual_seed(0)
    tuned = build_model("tiny_lite", pretrained=False)
    liver = resolve("Liver", "CT").indices
    tuned.tune_decoder_for([liver])
    with torch.no_grad():
        for param in tuned.tuned_decoder.parameters():
            param.add_(0.02)
    save_checkpoint(tuned, tmp_path / "tuned.pth")
    saved = torch.load(tmp_path / "tuned.pth", weights_only=True)["model"]
    assert saved["tuned_contexts"].tolist() == [list(liver)] and any(k.startswith("tuned_decoder.") for k in saved)

    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    load_checkpoint(model, tmp_path / "tuned.pth")
    images, boxes = torch.rand(1, 3, 256, 256), torch.tensor([[10.0, 20.0, 150.0, 160.0]])
    with torch.no_grad():
        assert torch.equal(model(images, boxes, _context())[0], tuned(images, boxes, _context())[0])
    plain = build_model("tiny_lite", pretrained=False)
    save_checkpoint(plain, tmp_path / "plain.pth")  # no tuned decoder (as the official layout)
    load_checkpoint(model, tmp_path / "plain.pth")
    assert model.tuned_decoder is None and not model.tuned_context_set()
    assert not any(k.startswith("tuned") for k in model.state_dict())
