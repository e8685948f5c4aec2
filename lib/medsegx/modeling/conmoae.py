"""ConMoAE: the Contextual Mixture of Adapter Experts wrapped around a transformer block's MLP.

In every wrapped block the MLP becomes ``out = MLP(x) + 0.1 * sum_k g_k * E_k(x)`` where
``x`` are the block's normalised tokens, ``E_k = Up_k(Dropout(GELU(Down_k(x))))`` and the
expert gates ``g = softmax(Linear([organ; task; modality; input]))``. The wrapper is
backbone-agnostic: it works on SAM's ViT blocks (tokens ``(B, H, W, C)``) and on
LiteMedSAM's TinyViT blocks (tokens ``(B, L, C)``, the LayerNorm inside the MLP).

Module and parameter names follow the official MedSegX checkpoint layout
(``mlp.mlp.*``, ``mlp.adapter_down.{k}``, ``mlp.adapter_up.{k}``, ``mlp.adapter_input_embed``,
``mlp.adapter_gate``, ``mlp.adapter_organ_gate``; ``modal_embed``, ``organ_embed.{0..4}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_ORGAN_LEVELS = 4  # root, body part, subregion, organ/tissue


def _lookup(table: nn.Embedding, index: torch.Tensor) -> torch.Tensor:
    """Embedding rows for ``index``; a ``-1`` ("unknown level") embeds as a zero vector."""
    known = (index >= 0).to(table.weight.dtype).unsqueeze(-1)
    return table(index.clamp(min=0)) * known


def context_vectors(modal_embed: nn.Embedding, organ_embed: nn.ModuleList, context: torch.Tensor) -> dict:
    """Per-sample context vectors from the zero-initialised tables shared by all blocks.

    Args:
        modal_embed: the modality table (``image_encoder.modal_embed``).
        organ_embed: root, level-1, level-2, level-3 and task tables (``image_encoder.organ_embed``).
        context: (B, 5) long, columns (modality, level-1 body part, level-2 subregion,
            level-3 organ, task); ``-1`` in a level column means unknown.

    Returns:
        ``{"modality": (B, E), "organ": [4 x (B, E)] for root..level 3, "task": (B, E)}``.
    """
    if context.ndim != 2 or context.shape[1] != 5:
        raise ValueError(f"context must be (B, 5) long indices, got shape {tuple(context.shape)}")
    context = context.to(modal_embed.weight.device, torch.long)
    root = torch.zeros_like(context[:, 0])
    return {
        "modality": _lookup(modal_embed, context[:, 0]),
        "organ": [_lookup(organ_embed[0], root)] + [_lookup(organ_embed[i], context[:, i]) for i in (1, 2, 3)],
        "task": _lookup(organ_embed[4], context[:, 4]),
    }


class ContextState:
    """Per-forward context shared by every wrapped block (set by ``MedSegXModel.encode``).

    Not an ``nn.Module`` on purpose: blocks hold a reference without registering it, so the
    state dict keeps the official key names.
    """

    def __init__(self) -> None:
        self.vectors: dict | None = None
        self.gates: list[torch.Tensor] = []
        self.mc_dropout = False


class ConMoAEMLP(nn.Module):
    """A block's MLP plus K bottleneck adapter experts mixed by context-aware gates.

    Args:
        mlp: the original MLP module (kept as ``self.mlp``; frozen by the model).
        dim: token width C.
        state: the shared ``ContextState`` read at forward time.
        num_experts: K (paper: 4).
        bottleneck_dim: adapter bottleneck (paper: 16).
        embedding_dim: context embedding width E (paper: 16).
        scale: adapter output scale (paper: 0.1).
        dropout: dropout inside each expert (paper: 0.1).
        pre_norm: applied to the MLP input to get the normalised tokens the adapters see,
            for backbones whose LayerNorm lives inside the MLP (TinyViT); ``None`` for SAM.
    """

    def __init__(
        self,
        mlp: nn.Module,
        dim: int,
        state: ContextState,
        num_experts: int = 4,
        bottleneck_dim: int = 16,
        embedding_dim: int = 16,
        scale: float = 0.1,
        dropout: float = 0.1,
        pre_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.mlp = mlp
        self.num_experts = num_experts
        self.adapter_scale = scale
        self.adapter_dropout = dropout
        self.adapter_input_embed = nn.Linear(dim, embedding_dim)
        self.adapter_gate = nn.Linear(embedding_dim * 4, num_experts)
        self.adapter_organ_gate = nn.Linear(embedding_dim * NUM_ORGAN_LEVELS, NUM_ORGAN_LEVELS)
        self.adapter_down = nn.ModuleList([nn.Linear(dim, bottleneck_dim) for _ in range(num_experts)])
        self.adapter_up = nn.ModuleList([nn.Linear(bottleneck_dim, dim) for _ in range(num_experts)])
        self._state = state
        self._pre_norm = (pre_norm,) if pre_norm is not None else ()
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """Down: kaiming-uniform(a=sqrt 5), bias 0; Up: weight and bias 0 (identity at start)."""
        for down, up in zip(self.adapter_down, self.adapter_up):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def context_input(self, vectors: dict) -> torch.Tensor:
        """The context part ``[o; t; m]`` (B, 3E) of the gate input, from ``context_vectors``."""
        organ_levels = vectors["organ"]
        organ_weights = torch.softmax(self.adapter_organ_gate(torch.cat(organ_levels, dim=-1)), dim=-1)
        organ = torch.einsum("ble,bl->be", torch.stack(organ_levels, dim=1), organ_weights)
        return torch.cat([organ, vectors["task"], vectors["modality"]], dim=-1)

    def expert_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """Args: tokens (B, ..., C) normalised. Returns: gates (B, K), softmax over experts."""
        vectors = self._state.vectors
        if vectors is None:
            raise RuntimeError("ConMoAE block called without context: use MedSegXModel.encode(images, context)")
        pooled = tokens.mean(dim=tuple(range(1, tokens.ndim - 1)))
        gate_input = torch.cat([self.context_input(vectors), self.adapter_input_embed(pooled)], dim=-1)
        return torch.softmax(self.adapter_gate(gate_input), dim=-1)

    def up_is_zero(self) -> bool:
        """Every expert's Up layer is zero: the experts add exactly nothing (a fresh ConMoAE)."""
        return not any(up.weight.any() or up.bias.any() for up in self.adapter_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._pre_norm[0](x) if self._pre_norm else x
        gates = self.expert_gates(tokens)
        self._state.gates.append(gates)
        if not torch.is_grad_enabled() and not _exporting() and self.up_is_zero():
            # inference before fine-tuning: the experts' sum is exactly 0, so skip their matmuls
            # (~1/4 of the lite encoder's eager time). With gradients on, Up must see its inputs.
            return self.mlp(x)
        dropout_on = self.training or self._state.mc_dropout
        # sum_k g_k * Up_k(h_k) == [W_up_1 .. W_up_K] @ [g_1 h_1; ..; g_K h_K] + sum_k g_k b_up_k:
        # the K experts run as one matmul each way instead of K full-width outputs stacked.
        down_weight = torch.cat([down.weight for down in self.adapter_down])
        down_bias = torch.cat([down.bias for down in self.adapter_down])
        hidden = F.dropout(F.gelu(F.linear(tokens, down_weight, down_bias)), p=self.adapter_dropout,
                           training=dropout_on)  # (B, ..., K * bottleneck)
        lead = (gates.shape[0],) + (1,) * (hidden.ndim - 2)
        bottleneck = hidden.shape[-1] // self.num_experts
        hidden = hidden * gates.repeat_interleave(bottleneck, dim=-1).view(*lead, -1)
        up_weight = torch.cat([up.weight for up in self.adapter_up], dim=1)
        up_bias = gates @ torch.stack([up.bias for up in self.adapter_up])  # (B, C)
        mixed = F.linear(hidden, up_weight) + up_bias.view(*lead, -1)
        return self.mlp(x) + mixed * self.adapter_scale


def _exporting() -> bool:
    """Inside ``torch.export`` / dynamo, which cannot branch on a tensor's values (the ONNX exporter)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (getattr(compiler, "is_exporting", lambda: False)()
                                          or compiler.is_compiling()))


def attach_conmoae(
    encoder: nn.Module,
    blocks: Sequence[nn.Module],
    dim_of: Callable[[nn.Module], int],
    num_modalities: int,
    level_sizes: Sequence[int],
    num_tasks: int,
    num_experts: int = 4,
    bottleneck_dim: int = 16,
    embedding_dim: int = 16,
    pre_norm_of: Callable[[nn.Module], Callable | None] | None = None,
) -> ContextState:
    """Wrap each block's ``mlp`` in a ``ConMoAEMLP`` and add the context tables to ``encoder``.

    Args:
        encoder: the image encoder; gains ``modal_embed`` and ``organ_embed`` (5 tables:
            root (1 row), the three levels, tasks (``num_tasks + 1`` rows, the last free)).
        blocks: the transformer blocks whose ``mlp`` attribute is wrapped.
        dim_of: token width of a block.
        level_sizes: rows of the level-1, level-2, level-3 tables.
        pre_norm_of: returns the LayerNorm to apply before the adapters, for MLPs that
            normalise internally (TinyViT); ``None`` for SAM blocks.

    Returns:
        The shared ``ContextState`` the model sets before each encoder forward.
    """
    encoder.modal_embed = nn.Embedding(num_modalities, embedding_dim)
    encoder.organ_embed = nn.ModuleList(
        [nn.Embedding(1, embedding_dim)]
        + [nn.Embedding(size, embedding_dim) for size in level_sizes]
        + [nn.Embedding(num_tasks + 1, embedding_dim)]
    )
    for table in [encoder.modal_embed, *encoder.organ_embed]:
        nn.init.zeros_(table.weight)
    state = ContextState()
    for block in blocks:
        block.mlp = ConMoAEMLP(
            block.mlp,
            dim_of(block),
            state,
            num_experts=num_experts,
            bottleneck_dim=bottleneck_dim,
            embedding_dim=embedding_dim,
            pre_norm=pre_norm_of(block) if pre_norm_of else None,
        )
    return state
