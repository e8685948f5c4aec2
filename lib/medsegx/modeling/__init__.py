"""Pure nn.Modules: ConMoAE adapters, the keep-resolution decoder, SAM ViT and TinyViT backbones."""

from medsegx.modeling.backbones import (
    TINYVIT_CONFIGS,
    VIT_CONFIGS,
    ConMoAEConfig,
    ContextSizes,
    build_sam_vit,
    build_tinyvit,
)
from medsegx.modeling.conmoae import ConMoAEMLP, ContextState, attach_conmoae, context_vectors
from medsegx.modeling.mask_decoder import KeepResolutionMaskDecoder
from medsegx.modeling.model import IMAGE_SIZE, MedSegXModel
from medsegx.modeling.normalize import PixelNormalize

__all__ = [
    "IMAGE_SIZE",
    "TINYVIT_CONFIGS",
    "VIT_CONFIGS",
    "ConMoAEConfig",
    "ConMoAEMLP",
    "ContextSizes",
    "ContextState",
    "KeepResolutionMaskDecoder",
    "MedSegXModel",
    "PixelNormalize",
    "attach_conmoae",
    "build_sam_vit",
    "build_tinyvit",
    "context_vectors",
]
