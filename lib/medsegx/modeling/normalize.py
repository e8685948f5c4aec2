"""The backbones' pixel normalisation: SAM's statistics, LiteMedSAM's min-max stretch, ``PixelNormalize``.

It sits beside the network, as segment-anything keeps ``pixel_mean`` / ``pixel_std`` on ``Sam``:
``MedSegXModel.pixel_normalize()`` returns the ``PixelNormalize`` of a model, and
``medsegx.items`` re-exports both names for items made without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "PixelNormalize", "stretch_minmax"]

# segment-anything's ImageNet statistics on the 0..255 scale (``Sam.pixel_mean`` / ``pixel_std``).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def stretch_minmax(images: torch.Tensor) -> torch.Tensor:
    """Each ``(3, h, w)`` image (or each of a ``(B, 3, h, w)`` batch) stretched to 0..255.

    LiteMedSAM's recipe: ``(x - min) / max(max - min, 1e-8)`` over the resized, unpadded image;
    here scaled by 255 so the backbone's own mean / std (0 / 255 for LiteMedSAM) follows.
    """
    low = images.amin(dim=(-3, -2, -1), keepdim=True)
    high = images.amax(dim=(-3, -2, -1), keepdim=True)
    return (images - low) * (255.0 / (high - low).clamp_min(1e-8))


class PixelNormalize:
    """``model.normalize`` without a model: ``(images - mean) / std`` on ``(B, 3, h, w)`` 0..255.

    ``model.pixel_normalize()`` gives the one matching a model (the lite backbone stretches
    each image first, ``minmax``); the defaults are SAM's statistics, what the ViT backbones use.
    A plain object of tensors, so it pickles into DataLoader workers.
    """

    def __init__(self, mean: Sequence[float] = SAM_PIXEL_MEAN, std: Sequence[float] = SAM_PIXEL_STD,
                 minmax: bool = False):
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(-1, 1, 1)
        self.minmax = minmax

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.minmax:
            images = stretch_minmax(images)
        return (images - self.mean.to(images.device)) / self.std.to(images.device)
