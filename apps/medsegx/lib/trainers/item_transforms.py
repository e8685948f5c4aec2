"""Thin MONAI dictionary wrappers around ``medsegx.items`` (the array logic lives there)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.transforms import MapTransform, Randomizable

from medsegx.items import TRAIN_BOX_JITTER, item_from_arrays, jitter_box


class ToModelInputd(MapTransform):
    """A slice sample (``image``, ``mask``, ``context``) -> model tensors.

    ``image`` becomes the ``(3, 256, 256)`` input made by ``medsegx.transforms.to_model_input``
    with the model's own normalisation, as the predictor makes it; ``mask`` becomes ``label``
    in the 256 frame; ``box`` is the mask's exact bounding box there (see
    ``medsegx.items.item_from_arrays``). Other keys pass through.

    Args:
        normalize: ``model.normalize``.
        device: the model's device (the image is resized and normalised there, as the
            predictor does).
    """

    def __init__(self, normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str | None = None):
        super().__init__(keys=["image", "mask", "context"])
        self.normalize = normalize
        self.device = device

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        item = item_from_arrays(data["image"], data["mask"], data["context"], self.normalize, self.device)
        extras = {key: value for key, value in data.items() if key not in ("image", "mask", "context")}
        return {**extras, **item}


class RandJitterBoxd(Randomizable, MapTransform):
    """Push each side of ``box`` out by a uniform random 0..``bound - 1`` px (``medsegx.items.jitter_box``).

    Args:
        max_shift: the bound, ``medsegx.items.TRAIN_BOX_JITTER`` (20, the paper's 0..19) by
            default; 0 keeps the exact box.
        max_fraction: with ``> 0``, the bound of a side is this share of the box's extent (at
            most ``max_shift``): the in-loop recipe, ``medsegx.budget.INLOOP_BOX_JITTER_FRACTION``.
    """

    def __init__(self, max_shift: int = TRAIN_BOX_JITTER, max_fraction: float = 0.0):
        MapTransform.__init__(self, keys=["box"])
        self.max_shift = int(max_shift)
        self.max_fraction = float(max_fraction)
        self._generator = torch.Generator().manual_seed(0)

    def set_random_state(self, seed: int | None = None, state=None):
        super().set_random_state(seed, state)
        self._generator.manual_seed(int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(data)
        out["box"] = jitter_box(out["box"], out["valid_hw"], self.max_shift, generator=self._generator,
                                max_fraction=self.max_fraction)
        return out
