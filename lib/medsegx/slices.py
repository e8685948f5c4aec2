"""Which 2D slices of a labelled volume to learn from, and how many per structure per epoch.

A labelled volume is split per structure (one label value = one structure); each structure
contributes the 2D slices (along the first axis of a ``(Z, H, W)`` stack, the slices the infer
task segments) where it covers at least ``min_pixels`` pixels. A ``SliceSample`` holds such a
slice exactly as the predictor receives it; ``medsegx.items.item_from_arrays`` turns it into
the model item. MONAI-free: the app's train task and ``bench/finetune_curve.py`` build on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MIN_STRUCTURE_PIXELS", "SliceSample", "StructureBalancedSampler", "evenly_spaced", "structure_slices"]

#: A slice shows a structure when its mask covers at least this many pixels; smaller
#: cross-sections (the tips of an organ) give boxes of a few pixels.
MIN_STRUCTURE_PIXELS = 10


def structure_slices(label_zhw: np.ndarray, min_pixels: int = MIN_STRUCTURE_PIXELS) -> dict[int, np.ndarray]:
    """Where each structure of a label stack appears.

    Args:
        label_zhw: ``(Z, H, W)`` integer label values (0 = background).
        min_pixels: a slice counts for a structure when it has at least this many pixels.

    Returns:
        ``{label value: ascending slice indices}`` for every non-zero value present; a value
        whose slices are all below ``min_pixels`` maps to an empty array.

    Raises:
        ValueError: ``label_zhw`` is not 3D or holds negative / non-integer values.
    """
    label_zhw = np.asarray(label_zhw)
    if label_zhw.ndim != 3:
        raise ValueError(f"label must be a (Z, H, W) stack, got shape {label_zhw.shape}")
    if label_zhw.dtype.kind == "f":
        if not np.all(np.isfinite(label_zhw)) or not np.array_equal(label_zhw, np.round(label_zhw)):
            raise ValueError("label holds non-integer values: not a label map")
        label_zhw = label_zhw.astype(np.int64)
    elif label_zhw.dtype.kind == "b":
        label_zhw = label_zhw.astype(np.uint8)
    if label_zhw.size and label_zhw.min() < 0:
        raise ValueError(f"label holds negative values (min {label_zhw.min()}): not a label map")
    values = [int(v) for v in np.unique(label_zhw) if v != 0]
    found: dict[int, np.ndarray] = {}
    for value in values:
        areas = (label_zhw == value).sum(axis=(1, 2))
        found[value] = np.flatnonzero(areas >= min_pixels)
    return found


def evenly_spaced(indices: Sequence[int], count: int, ends: bool = True) -> list[int]:
    """At most ``count`` of ``indices``, evenly spread over the list.

    Args:
        indices: ordered candidates (e.g. the slices showing a structure).
        count: how many to keep; ``<= 0`` keeps all.
        ends: keep the first and the last (covers the whole extent: candidate pools); with
            ``False`` the middle of each of ``count`` equal parts (representative slices,
            never only the tips of an organ: validation, few-shot labels).
    """
    indices = list(indices)
    if count <= 0 or len(indices) <= count:
        return indices
    if not ends or count == 1:
        return [indices[int((part + 0.5) * len(indices) / count)] for part in range(count)]
    positions = np.linspace(0, len(indices) - 1, count)
    return [indices[int(round(p))] for p in positions]


@dataclass
class SliceSample:
    """One 2D training / validation sample: a structure on one slice.

    Attributes:
        image: the slice exactly as the predictor receives it: ``(H, W)`` or ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool mask of the structure, same size as ``image``.
        context: ConMoAE indices ``(modality, level1, level2, level3, task)``.
        structure: key of the structure this slice belongs to (``"<volume id>:<value>"``);
            used to balance slices per structure.
        volume_id: the labelled volume (datastore image id or file name).
        label_name: the structure's name, as given with the label.
        slice_index: index along the stack's first axis (0 for a 2D picture).
    """

    image: np.ndarray
    mask: np.ndarray
    context: tuple[int, int, int, int, int]
    structure: str
    volume_id: str
    label_name: str
    slice_index: int


class StructureBalancedSampler(torch.utils.data.Sampler[int]):
    """Each epoch, at most ``max_per_structure`` random slices of every structure, shuffled.

    Bounds an epoch's cost whatever the volumes' sizes, and keeps a large organ from
    drowning a small one. A new subset is drawn at every ``__iter__`` (every epoch).

    Args:
        structures: the structure key of every dataset item (``SliceSample.structure``).
        max_per_structure: slices per structure per epoch; ``<= 0`` takes them all.
        seed: base seed; epoch ``e`` draws with ``seed + e``.
        shuffle: ``False`` keeps dataset order and takes the same evenly spread slices every
            epoch (the middle of equal parts of each structure's slices: validation).
        min_length: an epoch has at least this many items: the drawn slices repeat, each
            repeat in a new order (a structure with one labelled slice still fills an epoch;
            the box jitter differs at every visit).
    """

    def __init__(self, structures: Sequence[str], max_per_structure: int, seed: int = 0, shuffle: bool = True,
                 min_length: int = 0):
        self.groups: dict[str, list[int]] = {}
        for index, key in enumerate(structures):
            self.groups.setdefault(str(key), []).append(index)
        self.max_per_structure = int(max_per_structure)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.min_length = int(min_length)
        self.epoch = 0

    def _drawn(self) -> int:
        if self.max_per_structure <= 0:
            return sum(len(v) for v in self.groups.values())
        return sum(min(len(v), self.max_per_structure) for v in self.groups.values())

    def __len__(self) -> int:
        drawn = self._drawn()
        return max(drawn, self.min_length) if drawn else 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        chosen: list[int] = []
        for members in self.groups.values():
            if self.max_per_structure <= 0 or len(members) <= self.max_per_structure:
                picked = list(members)
            elif self.shuffle:
                order = torch.randperm(len(members), generator=generator)[: self.max_per_structure]
                picked = [members[i] for i in sorted(order.tolist())]
            else:
                picked = evenly_spaced(members, self.max_per_structure, ends=False)
            chosen.extend(picked)
        epoch: list[int] = []
        while chosen and len(epoch) < max(self.min_length, 1):
            order = torch.randperm(len(chosen), generator=generator).tolist() if self.shuffle else range(len(chosen))
            epoch.extend(chosen[i] for i in order)
        return iter(epoch[:len(self)])
