"""In-loop fine-tuning on labelled volumes: 2D training samples, train/val steps, publishing.

MONAI-free: the MONAI Label train task (``apps/medsegx/lib/trainers``) and the benchmark
(``bench/finetune_curve.py``) both build on these functions, so what the benchmark measures
is what the app trains.

Samples. A labelled volume is split per structure (one label value = one structure); each
structure contributes the 2D slices (along the first axis of a ``(Z, H, W)`` stack, the
slices the infer task segments) where it covers at least ``min_pixels`` pixels. A
``SliceSample`` holds the slice as the predictor sees it (uint8, prepared by
``medsegx.transforms.prepare_volume`` / ``prepare_intensity``) and the structure's mask at the
original size; ``item_from_arrays`` turns it into model tensors with the *same*
``medsegx.transforms.to_model_input`` the predictor uses, and the box is the mask's bounding
box mapped to the 256 frame with ``box_to_model`` (the predictor's box mapping). During
training ``jitter_box`` pushes each side out by a uniform random 0..19 px
(``medsegx.data.TRAIN_BOX_JITTER``, the paper's recipe); validation uses the exact box.

What is trained is what the paper fine-tunes: ``MedSegXModel.freeze_backbone`` leaves the
adapters, gates, context embeddings and the mask decoder trainable; the image encoder still
runs forward in every step (the adapters live inside it), so image embeddings are never
cached during training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsegx.checkpoint import atomic_path, save_checkpoint
from medsegx.data import TRAIN_BOX_JITTER
from medsegx.losses import DiceBCEMinLoss
from medsegx.metrics import dice_per_mask
from medsegx.modeling import MedSegXModel
from medsegx.transforms import IMAGE_SIZE, ResizeInfo, box_to_model, to_model_input

logger = logging.getLogger(__name__)

__all__ = [
    "FINETUNE_LR",
    "FINETUNE_WEIGHT_DECAY",
    "MIN_STRUCTURE_PIXELS",
    "SliceSample",
    "StructureBalancedSampler",
    "build_optimizer",
    "finite_or_none",
    "evenly_spaced",
    "item_from_arrays",
    "jitter_box",
    "mask_box",
    "mask_to_model",
    "mask_uncertainty",
    "parse_label_names",
    "predict_batch",
    "previous_checkpoint_path",
    "publish_checkpoint",
    "read_label_sidecar",
    "set_finetune_mode",
    "structure_slices",
    "train_step",
    "val_step",
]

#: AdamW learning rate and weight decay of the paper's downstream fine-tuning recipe.
FINETUNE_LR = 5e-5
FINETUNE_WEIGHT_DECAY = 0.01
#: A slice shows a structure when its mask covers at least this many pixels; smaller
#: cross-sections (the tips of an organ) give boxes of a few pixels.
MIN_STRUCTURE_PIXELS = 10
#: Keys of a label JSON sidecar that are not label names.
_SIDECAR_RESERVED = frozenset({"modality", "labels", "label_info", "label_names"})


# ----------------------------------------------------------------------------- label names


def parse_label_names(value: Any) -> dict[int, str]:
    """Label value -> structure name, from any of the label-map spellings in use.

    Accepted:

    - ``{"liver": 1, "spleen": 2}`` (name -> value; the sample data's sidecars, the app's
      label map);
    - ``{"1": "liver", "2": "spleen"}`` (value -> name);
    - ``[{"name": "liver", "idx": 1}, ...]`` (MONAI Label's Slicer client sends this as the
      ``label_info`` of a saved label; ``"value"`` / ``"index"`` are read as ``"idx"``);
    - a dict holding one of the above under ``"label_info"``, ``"label_names"`` or ``"labels"``.

    The value 0 (background) and entries that are not (name, positive integer) pairs are
    ignored.

    Returns:
        ``{value: name}``, empty when nothing usable was found.
    """
    if isinstance(value, Mapping):
        for key in ("label_info", "label_names", "labels"):
            if key in value:
                return parse_label_names(value[key])
        names: dict[int, str] = {}
        for key, item in value.items():
            if key in _SIDECAR_RESERVED:
                continue
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                label_value, name = int(item), str(key)
            elif isinstance(item, str) and str(key).strip().isdigit():
                label_value, name = int(str(key).strip()), item
            else:
                continue
            if label_value > 0 and name.strip():
                names[label_value] = name.strip()
        return names
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        names = {}
        for entry in value:
            if not isinstance(entry, Mapping) or "name" not in entry:
                continue
            raw = next((entry[k] for k in ("idx", "value", "index") if k in entry), None)
            try:
                label_value = int(raw)
            except (TypeError, ValueError):
                continue
            if label_value > 0 and str(entry["name"]).strip():
                names[label_value] = str(entry["name"]).strip()
        return names
    return {}


def read_label_sidecar(candidates: Sequence[str | os.PathLike]) -> tuple[dict[int, str], str | None, Path | None]:
    """Read the first existing label JSON sidecar among ``candidates``.

    A sidecar is a JSON file in any ``parse_label_names`` spelling, optionally with a
    ``"modality"`` entry (e.g. ``{"liver": 1, "spleen": 2, "modality": "CT"}``).

    Returns:
        ``(names, modality, path)``; ``({}, None, None)`` when no candidate exists. An
        unreadable sidecar is skipped with a warning.
    """
    for candidate in candidates:
        path = Path(candidate)
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable label sidecar %s: %s", path, err)
            continue
        modality = content.get("modality") if isinstance(content, Mapping) else None
        return parse_label_names(content), (str(modality) if modality else None), path
    return {}, None, None


# ----------------------------------------------------------------------------- samples


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


def mask_to_model(mask: np.ndarray | torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """``(H, W)`` mask -> ``(1, 256, 256)`` float {0, 1} in the model frame.

    Nearest-exact resize to the valid area, zero padding bottom/right (the image's
    longest-side resize and padding, ``medsegx.transforms``).
    """
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    if tuple(tensor.shape) != info.original_size:
        raise ValueError(f"mask shape {tuple(tensor.shape)} != image (H, W) {info.original_size}")
    height, width = info.resized_size
    tensor = tensor[None, None]
    if (height, width) != info.original_size:
        tensor = F.interpolate(tensor, size=(height, width), mode="nearest-exact")
    tensor = F.pad(tensor, (0, IMAGE_SIZE - width, 0, IMAGE_SIZE - height))
    return tensor[0]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive pixel bounding box ``(x0, y0, x1, y1)`` of a non-empty ``(H, W)`` mask.

    Raises:
        ValueError: the mask is empty.
    """
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    cols = np.flatnonzero(np.asarray(mask).any(axis=0))
    if rows.size == 0:
        raise ValueError("the mask is empty: no box")
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def item_from_arrays(image: np.ndarray, mask: np.ndarray, context: Sequence[int], normalize,
                     device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A prepared slice and its structure mask -> the tensors of one training item (exact box).

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8, as the predictor receives it.
        mask: ``(H, W)`` bool, non-empty.
        context: the 5 ConMoAE indices.
        normalize: ``model.normalize`` (the predictor's normalisation).
        device: where the image is resized and normalised (the model's device, as the
            predictor does); the other tensors stay on the CPU.

    Returns:
        ``{"image": (3, 256, 256) float normalised and padded, "label": (1, 256, 256) float,
        "box": (4,) float XYXY 256 frame, "valid_hw": (2,) long (rows, cols of the unpadded
        area), "context": (5,) long}``.

    Raises:
        ValueError: the mask is empty or its size differs from the image's.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    tensor, info = to_model_input(image, normalize, device)
    box = box_to_model(mask_box(mask), info)
    return {
        "image": tensor[0],
        "label": mask_to_model(mask, info),
        "box": torch.from_numpy(box),
        "valid_hw": torch.tensor(info.resized_size, dtype=torch.long),
        "context": torch.tensor(tuple(context), dtype=torch.long),
    }


def jitter_box(box: torch.Tensor, valid_hw: Sequence[int] | torch.Tensor, max_shift: int = TRAIN_BOX_JITTER,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Push each side of a 256-frame box out by a uniform random ``0..max_shift-1`` px.

    The convention of ``medsegx.data`` (``torch.randint(0, TRAIN_BOX_JITTER)``, paper:
    0..19 px), clipped to the valid (unpadded) area.

    Args:
        box: ``(4,)`` XYXY in the 256 frame.
        valid_hw: rows and columns of the unpadded area.
        max_shift: exclusive bound of the shift; 0 returns the box unchanged.
        generator: optional RNG (default: torch's global RNG, seeded per DataLoader worker).
    """
    box = torch.as_tensor(box, dtype=torch.float32)
    if max_shift <= 0:
        return box.clone()
    shifts = torch.randint(0, max_shift, (4,), generator=generator).float()
    jittered = box + shifts * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    height, width = (int(v) for v in valid_hw)
    upper = torch.tensor([width - 1.0, height - 1.0, width - 1.0, height - 1.0])
    return torch.minimum(jittered.clamp_min(0.0), upper)


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
    """

    def __init__(self, structures: Sequence[str], max_per_structure: int, seed: int = 0, shuffle: bool = True):
        self.groups: dict[str, list[int]] = {}
        for index, key in enumerate(structures):
            self.groups.setdefault(str(key), []).append(index)
        self.max_per_structure = int(max_per_structure)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def __len__(self) -> int:
        if self.max_per_structure <= 0:
            return sum(len(v) for v in self.groups.values())
        return sum(min(len(v), self.max_per_structure) for v in self.groups.values())

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
        if self.shuffle:
            chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]
        return iter(chosen)


# ----------------------------------------------------------------------------- steps


def build_optimizer(model: MedSegXModel, lr: float = FINETUNE_LR,
                    weight_decay: float = FINETUNE_WEIGHT_DECAY) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (adapters, gates, embeddings, mask decoder)."""
    params = [param for _, param in model.named_trainable_parameters()]
    if not params:
        raise ValueError("the model has no trainable parameters (was freeze_backbone undone?)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def set_finetune_mode(model: MedSegXModel) -> MedSegXModel:
    """Train mode for what is trained, eval mode for the frozen rest.

    The frozen encoder keeps eval behaviour (TinyViT's BatchNorm must not update its
    running statistics from a few slices); the adapters get their expert dropout (the
    ConMoAE blocks' own ``training`` flag only, not their wrapped frozen MLP) and the mask
    decoder trains.
    """
    model.eval()
    for block in model.conmoae_blocks:
        block.training = True
    model.mask_decoder.train()
    return model


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _autocast(device: torch.device | str, amp: bool):
    device = torch.device(device)
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_step(model: MedSegXModel, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               loss_function: DiceBCEMinLoss | None = None, device: torch.device | str = "cpu",
               amp: bool = False) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch of items (``item_from_arrays`` + ``jitter_box``).

    The encoder runs forward under the items' contexts (gradients reach the adapters and
    context embeddings through it), the loss is Dice + BCE taken as the minimum over the
    three masks, and only the trainable parameters move.

    Args:
        model: the model (put in ``set_finetune_mode`` here).
        batch: ``{"image": (B, 3, 256, 256), "label": (B, 1, 256, 256), "box": (B, 4),
            "context": (B, 5)}``.
        optimizer: over the trainable parameters (``build_optimizer``).
        loss_function: default ``DiceBCEMinLoss()``.
        device: where the step runs.
        amp: bfloat16 autocast on CUDA (ignored on CPU).

    Returns:
        ``{"loss": scalar tensor (detached), "pred": (B, 1, 256, 256) float {0, 1} of the mask
        that gave the minimum, "label": (B, 1, 256, 256), "mask_index": (B,) long}``.
    """
    loss_function = loss_function or DiceBCEMinLoss()
    set_finetune_mode(model)
    batch = _to_device(batch, device)
    with _autocast(device, amp):
        logits, _, _ = model(batch["image"], batch["box"], batch["context"])
    loss, mask_index = loss_function(logits.float(), batch["label"], return_index=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        chosen = logits.detach().float()[torch.arange(logits.shape[0], device=logits.device), mask_index]
        pred = (chosen > 0).float()[:, None]
    return {"loss": loss.detach(), "pred": pred, "label": batch["label"], "mask_index": mask_index}


@torch.no_grad()
def predict_batch(model: MedSegXModel, batch: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                  amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode forward: ``(logits (B, 3, 256, 256) float, predicted IoU (B, 3))``."""
    model.eval()
    batch = _to_device(batch, device)
    with _autocast(device, amp):
        logits, iou, _ = model(batch["image"], batch["box"], batch["context"])
    return logits.float(), iou.float()


def val_step(model: MedSegXModel, batch: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
             amp: bool = False) -> dict[str, torch.Tensor]:
    """Validation on a batch (exact boxes): the mask the predictor would return.

    The output is chosen by predicted IoU, as the infer task does (``Predictor``'s
    ``select="iou"``); the oracle choice (best Dice of the three, the paper's protocol) is
    reported beside it. Dice is computed on the 256 x 256 grid, sigmoid > 0.5.

    Returns:
        ``{"pred": (B, 1, 256, 256) float {0, 1} (IoU-chosen), "label", "dice": (B,) of the
        IoU-chosen mask, "dice_oracle": (B,), "chosen": (B,) long}``.
    """
    logits, iou = predict_batch(model, batch, device, amp)
    label = batch["label"].to(logits.device)
    per_mask = dice_per_mask(logits, label)
    chosen = iou.argmax(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    pred = (logits[rows, chosen] > 0).float()[:, None]
    return {"pred": pred, "label": label, "dice": per_mask[rows, chosen], "dice_oracle": per_mask.max(dim=1).values,
            "chosen": chosen}


# ----------------------------------------------------------------------------- uncertainty


def mask_uncertainty(probabilities: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Disagreement of an ensemble of masks: mean mutual information (BALD) in nats.

    The members are the three multimask outputs, times the Monte-Carlo dropout passes
    through the adapters when there are several: ``H(mean p) - mean H(p)`` per pixel, i.e.
    the part of the predictive entropy the members disagree on. 0 when all members agree
    (also when all are unsure in the same way); at most ``log 2``.

    Args:
        probabilities: ``(..., H, W)`` sigmoid probabilities; every leading index is a member.
        region: optional ``(H, W)`` bool/float weights (e.g. the prompt box); default all pixels.

    Returns:
        The mean over the region's pixels.
    """
    probabilities = probabilities.float().clamp(1e-6, 1 - 1e-6)
    members = probabilities.reshape(-1, *probabilities.shape[-2:])

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log() + (1 - p) * (1 - p).log())

    mutual_information = entropy(members.mean(dim=0)) - entropy(members).mean(dim=0)
    if region is None:
        return float(mutual_information.mean())
    weights = region.float().to(mutual_information.device)
    if float(weights.sum()) <= 0:
        return 0.0
    return float((mutual_information * weights).sum() / weights.sum())


# ----------------------------------------------------------------------------- publishing


def previous_checkpoint_path(path: str | os.PathLike) -> Path:
    """Where the replaced checkpoint is kept: ``model/medsegx.pth`` -> ``model/medsegx.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def publish_checkpoint(model: MedSegXModel, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                       optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                       keep_previous: bool = True) -> dict:
    """Replace the served checkpoint atomically, keeping the one it replaces.

    1. the current file (if any) is copied to ``previous_checkpoint_path(path)`` through a
       temporary file and a rename, so the ``.prev`` file is always whole;
    2. ``medsegx.checkpoint.save_checkpoint`` writes the new weights to a temporary file in the
       same folder and renames it over ``path``.

    A crash at any point leaves ``path`` either the old or the new checkpoint, never a
    partial file; readers that stat ``path`` (the infer task's model store) see one rename.

    Returns:
        The metadata written (with its new ``model_version``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_previous and path.is_file():
        previous = previous_checkpoint_path(path)
        with atomic_path(previous) as tmp_name:
            shutil.copyfile(path, tmp_name)
    meta = save_checkpoint(model, path, dict(metadata or {}), optimizer=optimizer, epoch=epoch)
    logger.info("published %s (model_version %s)", path, meta.get("model_version"))
    return meta


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or ``None`` when missing / nan (JSON-friendly metrics)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
