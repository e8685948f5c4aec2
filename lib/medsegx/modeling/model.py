"""``MedSegXModel``: a SAM-type model (image encoder with ConMoAE, prompt encoder, mask decoder)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from medsegx.modeling.conmoae import ConMoAEMLP, ContextState, context_vectors
from medsegx.modeling.normalize import PixelNormalize

IMAGE_SIZE = 256
TRAINABLE_ENCODER_KEYS = ("adapter", "modal_embed", "organ_embed")


def regate(gates: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``softmax(log gates + shift)`` over the experts: gates ``(B, num_blocks, K)`` moved by a
    ``MedSegXModel.context_gate_shift``."""
    return torch.softmax(torch.log(gates.clamp_min(1e-30)) + shift, dim=-1)


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
            (``medsegx.modeling.normalize.stretch_minmax``): LiteMedSAM's training and inference recipe
            (``(x - min) / (max - min)`` of the resized image); SAM's ViTs see the plain image.
        output_mask_tokens: the decoder's mask tokens returned as the three outputs. MedSegX
            uses SAM's multimask tokens (1, 2, 3). LiteMedSAM was trained single-mask (token 0:
            the only one whose IoU head is calibrated), so the lite model returns (0, 1, 2).

    The tuned decoder (``tune_decoder_for``): in-loop fine-tuning trains a copy of the mask
    decoder, ``tuned_decoder``, that decodes only the contexts it was tuned on
    (``tuned_contexts``, a persistent ``(N, 5)`` long buffer); every other context keeps
    ``mask_decoder``. The decoder is shared by all contexts and sees none, so fine-tuning it on
    one structure changed every other structure's masks (issue 14: -0.02 to -0.08 mean Dice
    on 21 structures after one round on the pancreas); routing leaves them as they were.
    ``structure_version`` counts changes to the modules (the serving runtime re-lists tensors).
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
        self.tuned_decoder: nn.Module | None = None
        self.register_buffer("tuned_contexts", None)  # (N, 5) long once a decoder is tuned
        self.structure_version = 0
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
        if self.tuned_decoder is not None:
            for param in self.tuned_decoder.parameters():
                param.requires_grad = True

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters, context embeddings and the whole mask decoder: what a MedSegX checkpoint holds
        (plus ``tuned_decoder.*`` and ``tuned_contexts`` once a decoder was tuned)."""
        return {
            name: value
            for name, value in self.state_dict().items()
            if name.startswith(("mask_decoder.", "tuned_decoder.")) or name == "tuned_contexts"
            or (name.startswith("image_encoder.") and any(key in name for key in TRAINABLE_ENCODER_KEYS))
        }

    # -- the tuned decoder ------------------------------------------------------------------
    def tune_decoder_for(self, contexts: Iterable[Iterable[int]], adapters: bool = False) -> None:
        """Prepare in-loop fine-tuning of ``contexts`` (5 ints each): they decode with the tuned decoder.

        The tuned decoder is made from ``mask_decoder`` the first time (same outputs until it is
        trained) and keeps the contexts it was tuned on before; ``mask_decoder`` is frozen, so
        the optimiser (``named_trainable_parameters``) trains the tuned copy only, and the
        adapters and context embeddings too when ``adapters`` (the offline recipe trains them;
        in a few-slice round they measured no gain, and frozen they keep every other context's
        embedding as it was).
        """
        wanted = {tuple(int(i) for i in c) for c in contexts}
        if any(len(c) != 5 for c in wanted):
            raise ValueError(f"contexts must be 5 ints each, got {sorted(wanted)}")
        wanted |= self.tuned_context_set()
        self._set_tuned(torch.tensor(sorted(wanted), dtype=torch.long).reshape(-1, 5))
        for param in self.mask_decoder.parameters():
            param.requires_grad = False
        for param in self.tuned_decoder.parameters():
            param.requires_grad = True
        for name, param in self.image_encoder.named_parameters():
            param.requires_grad = adapters and any(key in name for key in TRAINABLE_ENCODER_KEYS)

    def tuned_context_set(self) -> set[tuple[int, ...]]:
        """The contexts decoded by the tuned decoder (empty without one)."""
        if self.tuned_contexts is None:
            return set()
        return {tuple(int(i) for i in row) for row in self.tuned_contexts.tolist()}

    def match_state(self, state: dict[str, torch.Tensor]) -> None:
        """Add or drop the tuned decoder so that ``load_state_dict(state)`` fits (its ``tuned_contexts`` key)."""
        contexts = state.get("tuned_contexts")
        if contexts is not None:
            self._set_tuned(contexts.detach().to(torch.long).reshape(-1, 5).clone())
        elif self.tuned_decoder is not None:
            self._set_tuned(None)

    def _set_tuned(self, contexts: torch.Tensor | None) -> None:
        """Route ``contexts`` to the tuned decoder (a copy of ``mask_decoder`` if there is none yet);
        ``None`` drops it."""
        device = self.pixel_mean.device
        if contexts is None:
            self.tuned_decoder = None
        elif self.tuned_decoder is None:
            self.tuned_decoder = copy.deepcopy(self.mask_decoder).to(device)
        self.tuned_contexts = contexts.to(device) if contexts is not None else None
        self.structure_version += 1

    def uses_tuned_decoder(self, context: torch.Tensor | Iterable[int]) -> torch.Tensor | bool:
        """Whether ``context`` (5 ints) decodes with the tuned decoder; for a ``(B, 5)`` tensor, ``(B,)`` bool."""
        if isinstance(context, torch.Tensor) and context.ndim == 2:
            if self.tuned_contexts is None:
                return torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
            tuned = self.tuned_contexts.to(context.device)
            return (context[:, None, :] == tuned[None]).all(dim=-1).any(dim=1)
        return tuple(int(i) for i in context) in self.tuned_context_set()

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

    def pixel_normalize(self) -> PixelNormalize:
        """``normalize`` as a picklable ``PixelNormalize`` (for DataLoader workers)."""
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

    def context_gate_shift(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, num_blocks, K)``: what moving from ``source`` to ``target`` adds to every block's gate
        logits; ``regate(gates, shift)`` turns one image's expert gates under ``source`` into its gates
        under ``target``.

        Per block ``g = softmax(W [o; t; m; u] + b)``, where only ``u`` (the pooled tokens)
        depends on the image. Softmax ignores a shift, so ``softmax(log g + W[:, :3E] ([o; t; m]
        of target - of source))`` are the gates under ``target`` -- exact while the tokens do not
        depend on the context, i.e. while the adapters are inert (the embedding-cache case). The
        shift depends on the contexts and the weights only, not on the image.

        Args:
            source, target: (B, 5) long contexts.
        """
        state_source = context_vectors(self.image_encoder.modal_embed, self.image_encoder.organ_embed, source)
        state_target = context_vectors(self.image_encoder.modal_embed, self.image_encoder.organ_embed, target)
        shifts = []
        for block in self.conmoae_blocks:
            width = 3 * block.adapter_input_embed.out_features  # organ, task, modality come first
            shifts.append((block.context_input(state_target) - block.context_input(state_source))
                          @ block.adapter_gate.weight[:, :width].T)
        return torch.stack(shifts, dim=1)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None,
               points: tuple[torch.Tensor, torch.Tensor] | None = None,
               context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for one prompt per image.

        Args:
            embeddings: (B, 256, g, g) from ``encode``.
            boxes: (B, 4) XYXY in the 256 x 256 input frame, or None.
            points: optional (coords (B, N, 2) XY in the 256 frame, labels (B, N): 1 fg, 0 bg).
            context: (B, 5) or (5,) long, the prompts' contexts: those in ``tuned_contexts``
                decode with the tuned decoder. None: ``mask_decoder`` for all.

        Returns:
            logits (B, 3, 256, 256) of the three multimask outputs and predicted IoU (B, 3).
        """
        if boxes is not None:
            boxes = boxes.to(embeddings.dtype).reshape(-1, 1, 4)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        if self.tuned_decoder is None or context is None:
            return self._decode_with(self.mask_decoder, embeddings, sparse, dense)
        context = torch.as_tensor(context, dtype=torch.long, device=embeddings.device)
        rows = self.uses_tuned_decoder(context.reshape(-1, 5).expand(sparse.shape[0], -1))
        if bool(rows.all()):
            return self._decode_with(self.tuned_decoder, embeddings, sparse, dense)
        if not bool(rows.any()):
            return self._decode_with(self.mask_decoder, embeddings, sparse, dense)
        parts = [(index, self._decode_with(decoder, embeddings[index] if embeddings.shape[0] > 1 else embeddings,
                                           sparse[index], dense[index]))
                 for decoder, index in ((self.tuned_decoder, rows.nonzero()[:, 0]),
                                        (self.mask_decoder, (~rows).nonzero()[:, 0]))]
        logits = torch.empty(sparse.shape[0], *parts[0][1][0].shape[1:], dtype=parts[0][1][0].dtype,
                             device=embeddings.device)
        iou = torch.empty(sparse.shape[0], *parts[0][1][1].shape[1:], dtype=parts[0][1][1].dtype,
                          device=embeddings.device)
        for index, (part_logits, part_iou) in parts:
            logits[index], iou[index] = part_logits, part_iou
        return logits, iou

    def _decode_with(self, decoder: nn.Module, embeddings: torch.Tensor, sparse: torch.Tensor,
                     dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, iou = decoder.predict_masks(
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
        logits, iou = self.decode(embeddings, boxes, points, context)
        return logits, iou, gates
