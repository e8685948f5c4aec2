"""SAM's mask decoder computed in a cheaper, mathematically identical order (for the CPU graphs).

SAM's two-way transformer attends between a few prompt tokens (``T``: 5 output tokens + the
prompt's points, 7 for a box) and every image token (``M``: 4096 for LiteMedSAM's 64 x 64 grid).
Eager SAM projects all ``M`` image tokens to queries, keys, values and back in every cross
attention: ~1.3 GMAC of its ~1.7 GMAC on a 64 x 64 grid. With ``H`` heads and ``8 T < 128``
the same result is cheaper when the projection weights are applied to the *token* side:

- token -> image: ``softmax(Q_h (X Wk_h + bk_h)^T) (X Wv_h + bv_h)`` is
  ``softmax((Q_h Wk_h) X^T + c) (A_h X) Wv_h^T + bv_h`` (``c`` per row; softmax rows sum to 1);
- image -> token: ``softmax((X Wq_h + bq_h) K_h^T) V_h Wo_h^T`` is
  ``softmax(X (Wq_h^T K_h^T) + bq_h K_h^T) (V_h Wo_h^T)``,

so the image tokens meet ``H T`` (56) columns instead of 128 twice: ~0.6 GMAC for all cross
attention. The output upscaling (stride-2, kernel-2 transposed convolutions, LayerNorm2d,
GELU) runs on the image tokens as matrix products with a growing sub-position axis, and only
the selected masks' logits are put back into image order at the end, so no 256-channel image
is ever transposed. Same weights, same outputs up to float rounding
(``tests/unit/test_factored_decoder.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def factorable(decoder: nn.Module) -> str | None:
    """``None`` when ``decoder`` (a SAM ``MaskDecoder``) has the layout ``factored_predict_masks`` computes,
    else what differs."""
    transformer = getattr(decoder, "transformer", None)
    layers = getattr(transformer, "layers", None)
    if layers is None or not hasattr(transformer, "final_attn_token_to_image"):
        return "not SAM's two-way transformer"
    for layer in layers:
        for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            attention = getattr(layer, name, None)
            if not all(hasattr(attention, key) for key in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads")):
                return f"{name} is not SAM's Attention"
    for module in decoder.output_upscaling:
        if isinstance(module, nn.ConvTranspose2d):
            if (module.kernel_size != (2, 2) or module.stride != (2, 2) or module.padding != (0, 0)
                    or module.output_padding != (0, 0) or module.groups != 1 or module.dilation != (1, 1)):
                return "an upscaling convolution is not kernel 2, stride 2"
        elif type(module).__name__ != "LayerNorm2d" and not isinstance(module, nn.GELU):
            return f"upscaling holds a {type(module).__name__}"
    return None


def _head_sizes(attention: nn.Module) -> tuple[int, int, int]:
    """SAM ``Attention``'s heads, internal width and width per head."""
    width = attention.q_proj.out_features
    return attention.num_heads, width, width // attention.num_heads


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, D)`` -> ``(B, H, N, D / H)``."""
    batch, rows, width = x.shape
    return x.reshape(batch, rows, heads, width // heads).transpose(1, 2)


def token_to_image(attention: nn.Module, tokens: torch.Tensor, image_keys: torch.Tensor,
                   image_values: torch.Tensor, value_offset: torch.Tensor | None = None) -> torch.Tensor:
    """``attention(q=tokens, k=image_keys, v=image_values + value_offset)`` without projecting the image tokens.

    Args:
        tokens: ``(B, T, C)``; image_keys, image_values: ``(B or 1, M, C)``.
        value_offset: ``(1, 1, C)`` added to every value (softmax rows sum to 1, so it is added
            to the pooled rows instead of to the ``M`` image tokens).
    Returns:
        ``(B, T, C)``.
    """
    heads, width, head_width = _head_sizes(attention)
    channels = image_keys.shape[-1]
    queries = _heads(attention.q_proj(tokens), heads) / math.sqrt(head_width)  # (B, H, T, d)
    batch, _, count, _ = queries.shape
    key_weight = attention.k_proj.weight.reshape(heads, head_width, channels)
    mixed_queries = (queries @ key_weight).reshape(batch, heads * count, channels)
    key_bias = (queries * attention.k_proj.bias.reshape(1, heads, 1, head_width)).sum(-1)
    scores = mixed_queries @ image_keys.transpose(1, 2) + key_bias.reshape(batch, heads * count, 1)
    pooled = torch.softmax(scores, dim=-1) @ image_values
    if value_offset is not None:
        pooled = pooled + value_offset
    pooled = pooled.reshape(batch, heads, count, channels)
    value_weight = attention.v_proj.weight.reshape(heads, head_width, channels)
    out = pooled @ value_weight.transpose(1, 2) + attention.v_proj.bias.reshape(1, heads, 1, head_width)
    return attention.out_proj(out.transpose(1, 2).reshape(batch, count, width))


def image_to_token(attention: nn.Module, image_queries: torch.Tensor, tokens: torch.Tensor,
                   token_values: torch.Tensor, output_offset: torch.Tensor | None = None) -> torch.Tensor:
    """``attention(q=image_queries, k=tokens, v=token_values) + output_offset`` without projecting the image tokens.

    Args:
        image_queries: ``(B or 1, M, C)``; tokens, token_values: ``(B, T, C)``.
        output_offset: ``(1, 1, C)``, folded into the output projection's bias.
    Returns:
        ``(B, M, C)``.
    """
    heads, _, head_width = _head_sizes(attention)
    channels = image_queries.shape[-1]
    keys = _heads(attention.k_proj(tokens), heads) / math.sqrt(head_width)  # (B, H, T, d)
    values = _heads(attention.v_proj(token_values), heads)
    batch, _, count, _ = keys.shape
    query_weight = attention.q_proj.weight.reshape(heads, head_width, channels)
    mixed_keys = (keys @ query_weight).reshape(batch, heads * count, channels)  # (B, H T, C)
    query_bias = (keys * attention.q_proj.bias.reshape(1, heads, 1, head_width)).sum(-1)  # (B, H, T)
    # scores with the image tokens last: the softmax over the T tokens then runs along rows of M
    # contiguous values (over a last axis of 7 it took 0.64 ms per call in OpenVINO, now ~0.1 ms)
    scores = mixed_keys @ image_queries.transpose(1, 2) + query_bias.reshape(batch, heads * count, 1)
    rows = scores.shape[-1]
    weights = torch.softmax(scores.reshape(batch, heads, count, rows), dim=2).reshape(batch, heads * count, rows)
    out_weight = attention.out_proj.weight.reshape(channels, heads, head_width).permute(1, 2, 0)  # (H, d, C)
    projected = (values @ out_weight).reshape(batch, heads * count, channels)
    bias = attention.out_proj.bias if output_offset is None else attention.out_proj.bias + output_offset
    return weights.transpose(1, 2) @ projected + bias


def two_way_transformer(transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor,
                        tokens: torch.Tensor, image_offset: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer`` on image tokens ``image + image_offset`` (``(B or 1, M, C)``,
    position ``(1, M, C)``) and prompt tokens ``(B, T, C)``; returns ``(queries (B, T, C), keys (B, M, C))``.

    ``image_offset`` (``(1, 1, C)``: SAM's dense no-mask embedding) is never added to the ``M``
    tokens: the first layer adds it to the constant position embedding, the pooled values and
    the output bias, and its residual sum carries it on (one 4096 x 256 addition fewer).
    """
    queries, keys = tokens, image
    offset = image_offset
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            with_pe = queries + tokens
            queries = queries + layer.self_attn(q=with_pe, k=with_pe, v=queries)
        queries = layer.norm1(queries)
        positioned = keys + (image_pe if offset is None else image_pe + offset)
        queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                       positioned, keys, offset))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + image_to_token(layer.cross_attn_image_to_token, positioned,
                                                 queries + tokens, queries, offset))
        offset = None
    attended = token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + image_pe, keys)
    return transformer.norm_final_attn(queries + attended), keys


def upscale_tokens(upscaling: nn.Sequential, keys: torch.Tensor) -> torch.Tensor:
    """``output_upscaling`` on image tokens ``(B, M, C)``: returns ``(B, M, 4^L, C_out)``, the
    sub-positions of each token's ``2^L x 2^L`` output block as nested ``(row, col)`` bits, coarsest first."""
    x = keys.unsqueeze(2)
    for module in upscaling:
        if isinstance(module, nn.ConvTranspose2d):
            inputs, outputs = module.weight.shape[:2]
            weight = module.weight.permute(0, 2, 3, 1).reshape(inputs, 4 * outputs)  # columns (row, col, out)
            x = x @ weight + module.bias.repeat(4)
            x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * 4, outputs)
        elif isinstance(module, nn.GELU):
            x = F.gelu(x, approximate=module.approximate)
        else:  # LayerNorm2d: over channels at each pixel
            x = F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)
    return x


def factored_predict_masks(decoder: nn.Module, image_tokens: torch.Tensor, grid: tuple[int, int],
                           image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                           dense_prompt_embeddings: torch.Tensor, mask_indices: list[int],
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder.predict_masks`` (SAM's ``MaskDecoder``; ``factorable(decoder)`` is ``None``) on an
    embedding in token layout, for the masks ``mask_indices`` only.

    Args:
        image_tokens: ``(1, M, C)`` shared by all prompts, or ``(B, M, C)``: the embedding
            ``(B, C, h, w)`` as ``flatten(2).transpose(1, 2)`` (row-major pixels, ``M = h w``).
        grid: ``(h, w)``.
        image_pe: ``(1, C, h, w)``.
        sparse_prompt_embeddings: ``(B, N, C)``.
        dense_prompt_embeddings: ``(1 or B, 1 or M, C)`` (no mask input: SAM's ``no_mask_embed``, ``(1, 1, C)``).
        mask_indices: which of the decoder's mask tokens to return, in order.

    Returns:
        logits ``(B, K, h 2^L, w 2^L)`` and predicted IoU ``(B, K)`` for ``K = len(mask_indices)``.
    """
    grid_h, grid_w = grid
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    pe = image_pe.flatten(2).transpose(1, 2)
    if dense_prompt_embeddings.shape[:2] == (1, 1):
        queries, keys = two_way_transformer(decoder.transformer, image_tokens, pe, tokens, dense_prompt_embeddings)
    else:
        queries, keys = two_way_transformer(decoder.transformer, image_tokens + dense_prompt_embeddings, pe, tokens)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in mask_indices], dim=1)
    upscaled = upscale_tokens(decoder.output_upscaling, keys)  # (B, M, 4^L, c)
    rows, channels = upscaled.shape[0], upscaled.shape[-1]
    # (B, K, M 4^L): the mask pixels last, so the products with the K hypernetwork rows fill whole vectors
    logits = hyper @ upscaled.reshape(rows, -1, channels).transpose(1, 2)
    levels = sum(isinstance(module, nn.ConvTranspose2d) for module in decoder.output_upscaling)
    count = len(mask_indices)
    logits = logits.reshape(rows, count, grid_h, grid_w, *([2] * (2 * levels)))
    # (B, K, i, j, r1, c1, r2, c2, ...) -> (B, K, i, r1, r2, ..., j, c1, c2, ...)
    order = [0, 1, 2, *range(4, 4 + 2 * levels, 2), 3, *range(5, 4 + 2 * levels, 2)]
    side = 2**levels
    logits = logits.permute(order).reshape(rows, count, grid_h * side, grid_w * side)
    iou = decoder.iou_prediction_head(queries[:, 0])[:, mask_indices]
    return logits, iou
