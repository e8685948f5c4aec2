"""medsegx.modeling.factored_decoder: SAM's mask decoder in the cheaper order gives the same outputs."""

from __future__ import annotations

import pytest
import torch

from medsegx.build import build_model
from medsegx.modeling.factored_decoder import factorable, factored_predict_masks


def _randomise_decoder(decoder: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random, biases included (a fresh SAM decoder has some zero biases, which would
    hide a misplaced bias term)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in decoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if param.ndim == 1 else 0.05))


# tiny_lite: LiteMedSAM's decoder (2 transposed convolutions); tiny_vit: the keep-resolution head (4)
@pytest.mark.parametrize("backbone", ["tiny_lite", "tiny_vit"])
@pytest.mark.parametrize("prompts", ["box", "three boxes", "clicks", "box and clicks"])
def test_factored_decoder_matches_predict_masks(backbone, prompts):
    model = build_model(backbone).eval()
    decoder, prompt = model.mask_decoder, model.prompt_encoder
    _randomise_decoder(decoder)
    assert factorable(decoder) is None
    generator = torch.Generator().manual_seed(1)
    grid = prompt.image_embedding_size
    embeddings = torch.randn(1, decoder.transformer_dim, *grid, generator=generator)
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [0.0, 0.0, 255.0, 255.0], [100.0, 100.0, 110.0, 104.0]])
    clicks = (torch.tensor([[[60.0, 70.0], [200.0, 20.0], [128.0, 128.0]]]), torch.tensor([[1, 0, 1]]))
    boxes, points = {"box": (boxes[:1], None), "three boxes": (boxes, None), "clicks": (None, clicks),
                     "box and clicks": (boxes[:1], clicks)}[prompts]
    with torch.no_grad():
        sparse, dense = prompt(points=points, boxes=boxes, masks=None)
        expected, expected_iou = decoder.predict_masks(embeddings, prompt.get_dense_pe(), sparse, dense)
        logits, iou = factored_predict_masks(
            decoder, embeddings.flatten(2).transpose(1, 2), grid, prompt.get_dense_pe(), sparse,
            prompt.no_mask_embed.weight.reshape(1, 1, -1), [2, 0, 1])
    assert logits.shape == (sparse.shape[0], 3, *expected.shape[-2:])
    expected, expected_iou = expected[:, [2, 0, 1]], expected_iou[:, [2, 0, 1]]
    assert float((logits - expected).norm() / expected.norm()) < 1e-5
    assert torch.allclose(iou, expected_iou, atol=1e-5)
    assert ((logits > 0) == (expected > 0)).float().mean() > 0.9999


def test_a_decoder_of_another_layout_is_not_factored():
    decoder = build_model("tiny_lite").mask_decoder
    decoder.output_upscaling[0] = torch.nn.ConvTranspose2d(decoder.transformer_dim, 64, kernel_size=4, stride=2,
                                                           padding=1)
    assert "kernel 2, stride 2" in factorable(decoder)


def test_decoder_graph_factored_or_not_gives_the_same_logits():
    from medsegx.runtime import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, DecoderGraph

    model = build_model("tiny_lite").eval()
    _randomise_decoder(model.mask_decoder)
    graph = DecoderGraph(model)
    assert graph.factored
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, graph.grid[0] * graph.grid[1], model.mask_decoder.transformer_dim, generator=generator)
    coords = torch.tensor([[[10.0, 20.0], [100.0, 120.0]]])
    labels = torch.tensor([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]])
    with torch.no_grad():
        factored = graph(tokens, coords, labels)
        graph.factored = False
        plain = graph(tokens, coords, labels)
    assert float((factored[0] - plain[0]).norm() / plain[0].norm()) < 1e-5
    assert torch.allclose(factored[1], plain[1], atol=1e-5)


def test_a_dense_prompt_per_image_token_gives_the_same_logits():
    """A mask prompt's dense embedding differs per image token: it is added to the tokens, not folded."""
    model = build_model("tiny_lite").eval()
    decoder, prompt = model.mask_decoder, model.prompt_encoder
    _randomise_decoder(decoder)
    generator = torch.Generator().manual_seed(2)
    grid = prompt.image_embedding_size
    embeddings = torch.randn(1, decoder.transformer_dim, *grid, generator=generator)
    dense = torch.randn(1, decoder.transformer_dim, *grid, generator=generator)
    with torch.no_grad():
        sparse, _ = prompt(points=None, boxes=torch.tensor([[30.0, 40.0, 120.0, 150.0]]), masks=None)
        expected, expected_iou = decoder.predict_masks(embeddings, prompt.get_dense_pe(), sparse, dense)
        logits, iou = factored_predict_masks(decoder, embeddings.flatten(2).transpose(1, 2), grid,
                                             prompt.get_dense_pe(), sparse, dense.flatten(2).transpose(1, 2), [0, 1])
    assert float((logits - expected[:, :2]).norm() / expected[:, :2].norm()) < 1e-5
    assert torch.allclose(iou, expected_iou[:, :2], atol=1e-5)
