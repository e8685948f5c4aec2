"""``MedSegXModel``: a SAM-type model (image encoder with ConMoAE, prompt encoder, mask decoder)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from medsegx.modeling.conmoae import ConMoAEMLP, ContextState, context_vectors

IMAGE_SIZE = 256
TRAINABLE_ENCODER_KEYS = ("adapter", "modal_embed", "organ_embed")


class MedSegXModel(nn.Module):
    """ConMoAE-SAM at 256 x 256.

    Args:
        image_encoder: SAM ``ImageEncoderViT`` or LiteMedSAM ``TinyViT`` with ConMoAE attached.
        prompt_encoder: SAM prompt encoder for a 256 x 256 input frame.
        mask_decoder: SAM-style decoder returning 256 x 256 mask logits.
        context_state: the ``ContextState`` shared by the encoder's ConMoAE blocks.
        backbone: "lite", "vit_b", "vit_l" or "vit_h" (or "tiny_*" in tests).
        pixel_mean, pixel_std: per-channel normalisation of 0..255 input
            (SAM's for ViT; 0 and 255 for LiteMedSAM, which expects 0..1).
        minmax_intensity: stretch each image to its own 0..255 range first
            (``medsegx.items.stretch_minmax``): LiteMedSAM's training and inference recipe
            (``(x - min) / (max - min)`` of the resized image); SAM's ViTs see the plain image.
        output_mask_tokens: the decoder's mask tokens returned as the three outputs. MedSegX
            uses SAM's multimask tokens (1, 2, 3). LiteMedSAM was trained single-mask (token 0:
            the only one whose IoU head is calibrated), so the lite model returns (0, 1, 2).
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 context_state: ContextState, backbone: str,
                 pixel_mean: tuple[float, float, float], pixel_std: tuple[float, float, float],
                 output_mask_tokens: tuple[int, int, int] = (1, 2, 3), minmax_intensity: bool = False) -> None:
        super().__init__()
        self.minmax_intensity = minmax_intensity
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.backbone = backbone
        self.image_size = IMAGE_SIZE
        self.output_mask_tokens = list(output_mask_tokens)
        self._context_state = context_state
        self.weight_sources = {"backbone": "random init", "medsegx": "fresh ConMoAE (zero-initialised Up layers)"}
        self.metadata: dict = {}
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.freeze_backbone()

    # -- parameters -------------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        """Freeze what the paper freezes: encoder (but adapters/embeddings) and prompt encoder."""
        for name, param in self.image_encoder.named_parameters():
            param.requires_grad = any(key in name for key in TRAINABLE_ENCODER_KEYS)
        for param in self.prompt_encoder.parameters():
            param.requires_grad = False
        for param in self.mask_decoder.parameters():
            param.requires_grad = True

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters, context embeddings and the whole mask decoder: what a MedSegX checkpoint holds."""
        return {
            name: value
            for name, value in self.state_dict().items()
            if name.startswith("mask_decoder.")
            or (name.startswith("image_encoder.") and any(key in name for key in TRAINABLE_ENCODER_KEYS))
        }

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.named_parameters() if p.requires_grad)

    @property
    def conmoae_blocks(self) -> list[ConMoAEMLP]:
        return [m for m in self.image_encoder.modules() if isinstance(m, ConMoAEMLP)]

    def set_mc_dropout(self, enabled: bool) -> None:
        """Keep the adapter experts' dropout on at inference (Monte-Carlo dropout uncertainty)."""
        self._context_state.mc_dropout = enabled

    # -- forward ----------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (B, 3, h, w) float in 0..255. Returns: backbone input (pad with 0 *after* this)."""
        return self.pixel_normalize()(images)

    def pixel_normalize(self):
        """``normalize`` as a picklable ``medsegx.items.PixelNormalize`` (for DataLoader workers)."""
        from medsegx.items import PixelNormalize  # items imports the backbones, which import this module

        return PixelNormalize(self.pixel_mean.flatten().tolist(), self.pixel_std.flatten().tolist(),
                              minmax=self.minmax_intensity)

    def encode(self, images: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the image encoder under a context.

        Args:
            images: (B, 3, 256, 256) normalised and zero-padded (see ``normalize``).
            context: (B, 5) long (modality, level 1, level 2, level 3, task); -1 = unknown level.

        Returns:
            image embeddings (B, 256, g, g) and expert gates (B, num_blocks, K).
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        if context.shape[0] != images.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != image batch {images.shape[0]}")
        state = self._context_state
        state.vectors = context_vectors(self.image_encoder.modal_embed, self.image_encoder.organ_embed, context)
        state.gates = []
        try:
            embeddings = self.image_encoder(images)
            gates = torch.stack(state.gates, dim=1)
        finally:
            state.vectors, state.gates = None, []
        return embeddings, gates

    def gates_for_context(self, gates: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One image's expert gates under ``target``, from its gates under ``source``.

        Per block ``g = softmax(W [o; t; m; u] + b)``, where only ``u`` (the pooled tokens)
        depends on the image. Softmax ignores a shift, so ``softmax(log g + W[:, :3E] ([o; t; m]
        of target - of source))`` are the gates under ``target`` -- exact while the tokens do not
        depend on the context, i.e. while the adapters are inert (the embedding-cache case).

        Args:
            gates: (B, num_blocks, K) from ``encode`` under ``source``.
            source, target: (B, 5) long contexts.
        """
        state_source = context_vectors(self.image_encoder.modal_embed, self.image_encoder.organ_embed, source)
        state_target = context_vectors(self.image_encoder.modal_embed, self.image_encoder.organ_embed, target)
        regated = []
        for index, block in enumerate(self.conmoae_blocks):
            width = 3 * block.adapter_input_embed.out_features  # organ, task, modality come first
            shift = (block.context_input(state_target) - block.context_input(state_source)) @ \
                block.adapter_gate.weight[:, :width].T
            regated.append(torch.softmax(torch.log(gates[:, index].clamp_min(1e-30)) + shift, dim=-1))
        return torch.stack(regated, dim=1)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None,
               points: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for one prompt per image.

        Args:
            embeddings: (B, 256, g, g) from ``encode``.
            boxes: (B, 4) XYXY in the 256 x 256 input frame, or None.
            points: optional (coords (B, N, 2) XY in the 256 frame, labels (B, N): 1 fg, 0 bg).

        Returns:
            logits (B, 3, 256, 256) of the three multimask outputs and predicted IoU (B, 3).
        """
        if boxes is not None:
            boxes = boxes.to(embeddings.dtype).reshape(-1, 1, 4)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        logits, iou = self.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return logits[:, self.output_mask_tokens], iou[:, self.output_mask_tokens]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, context: torch.Tensor,
                points: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns (logits (B, 3, 256, 256), iou (B, 3), expert gates (B, num_blocks, K))."""
        embeddings, gates = self.encode(images, context)
        logits, iou = self.decode(embeddings, boxes, points)
        return logits, iou, gates
