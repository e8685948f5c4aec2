"""SAM's mask decoder with the MedSegX keep-resolution head (masks straight out at 256 x 256)."""

from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder

# Module indices of ``output_upscaling`` that hold weights in the official layout.
UPSCALING_CHANNELS = (64, 32, 16, 8)


class KeepResolutionMaskDecoder(MaskDecoder):
    """Two-way transformer unchanged; ``output_upscaling`` is four stride-2 transposed convs.

    256 -> 64 -> 32 -> 16 -> 8 channels: the first three are each followed by LayerNorm2d
    then GELU, the last by GELU only (indices 0, 1, 3, 4, 6, 7, 9 hold weights). A 16 x 16
    embedding grid therefore yields 256 x 256 masks. The hypernetwork MLPs output 8 channels.
    """

    def __init__(self, *, transformer_dim: int, transformer: nn.Module, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        layers: list[nn.Module] = []
        in_channels = transformer_dim
        for i, out_channels in enumerate(UPSCALING_CHANNELS):
            layers.append(nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2))
            if i < len(UPSCALING_CHANNELS) - 1:
                layers.append(LayerNorm2d(out_channels))
            layers.append(nn.GELU())
            in_channels = out_channels
        self.output_upscaling = nn.Sequential(*layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            [MLP(transformer_dim, transformer_dim, UPSCALING_CHANNELS[-1], 3) for _ in range(self.num_mask_tokens)]
        )

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
        """As SAM's, but one prompt per image in a batch is not expanded B x B times.

        Args:
            image_embeddings: (B, 256, h, w), or (1, 256, h, w) shared by all prompts.
            sparse_prompt_embeddings: (B, N, 256).
        Returns:
            masks (B, 4, 16h, 16w) logits and iou predictions (B, 4).
        """
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        if image_embeddings.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        else:
            src = image_embeddings
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
