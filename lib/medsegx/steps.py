"""The one training step and validation step of MedSegX, for every way of training it.

The app's train task (``apps/medsegx/lib/trainers/medsegx.py``, in-loop fine-tuning on the
datastore's labels), the few-shot benchmark (``bench/finetune_curve.py``) and the offline
trainer (``training/medsegx_training``, ``medsegx-pretrain`` / ``medsegx-finetune`` on MedSegDB)
all run these functions on batches of ``medsegx.items`` items. What differs between them
(MONAI's ignite engines; DDP, gradient accumulation, LR schedules and resume in the offline
trainer) wraps ``training_loss`` / ``train_step`` and never copies them.

- Forward: the encoder runs under the items' contexts (gradients reach the adapters and
  context embeddings through it) in the train-mode policy of ``set_train_mode``, with
  bfloat16 autocast on CUDA (``amp``).
- Loss: Dice + BCE per mask, the minimum over the three masks per sample (the paper's
  recipe), plus, with ``iou_loss_weight > 0``, the IoU head's MSE to the masks' actual IoU.
- Optimiser: AdamW over what is trained (adapters, gates, context embeddings, mask decoder).
- Validation: exact boxes, eval mode; Dice of the mask chosen by predicted IoU (what the
  predictor returns) and of the best of the three (the paper's oracle protocol).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medsegx.losses import DiceBCEMinLoss
from medsegx.metrics import dice_per_mask
from medsegx.modeling import MedSegXModel
from medsegx.predictor import box_fit_choice
from medsegx.transforms import content_key

__all__ = [
    "EncoderMemo",
    "FINETUNE_LR",
    "FINETUNE_WEIGHT_DECAY",
    "TrainingLoss",
    "autocast",
    "build_optimizer",
    "mask_iou",
    "predict_batch",
    "set_train_mode",
    "to_device",
    "train_step",
    "training_loss",
    "unwrap",
    "val_step",
]

#: AdamW learning rate and weight decay of the paper's downstream fine-tuning recipe.
FINETUNE_LR = 5e-5
FINETUNE_WEIGHT_DECAY = 0.01


def build_optimizer(model: MedSegXModel, lr: float = FINETUNE_LR,
                    weight_decay: float = FINETUNE_WEIGHT_DECAY) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (adapters, gates, embeddings, mask decoder)."""
    params = [param for _, param in model.named_trainable_parameters()]
    if not params:
        raise ValueError("the model has no trainable parameters (was freeze_backbone undone?)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def unwrap(model: nn.Module) -> MedSegXModel:
    """The ``MedSegXModel`` inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)


def set_train_mode(model: nn.Module) -> nn.Module:
    """Train mode for what is trained, eval mode for the frozen rest.

    The frozen encoder keeps eval behaviour (TinyViT's BatchNorm must not update its
    running statistics); the adapters get their expert dropout (the ConMoAE blocks' own
    ``training`` flag only, not their wrapped frozen MLP) when they are trained, and the
    decoders that train (``mask_decoder``, the tuned decoder) are in train mode. With frozen
    adapters (the in-loop recipe) the encoder is deterministic and builds no autograd graph.
    ``model`` may be wrapped in ``DistributedDataParallel``.
    """
    inner = unwrap(model)
    inner.eval()
    adapters_trained = any(param.requires_grad for block in inner.conmoae_blocks for param in block.parameters())
    for block in inner.conmoae_blocks:
        block.training = adapters_trained
    for decoder in (inner.mask_decoder, inner.tuned_decoder):
        if decoder is not None and any(param.requires_grad for param in decoder.parameters()):
            decoder.train()
    return model


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (asynchronous copies from pinned memory on CUDA)."""
    non_blocking = torch.device(device).type == "cuda"
    return {key: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def autocast(device: torch.device | str, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mask_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, M) IoU of every thresholded mask with the target (1 where both are empty)."""
    pred = torch.sigmoid(logits.float()) > threshold
    truth = target > 0.5
    intersection = (pred & truth).sum(dim=(2, 3)).float()
    union = (pred | truth).sum(dim=(2, 3)).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.ones_like(union))


class EncoderMemo:
    """Encoder outputs of a round whose encoder is frozen, by image content and context (LRU).

    An in-loop round trains the tuned decoder alone (``MedSegXModel.tune_decoder_for``): the
    encoder is frozen and deterministic (``set_train_mode``), and each labelled slice comes back
    every epoch with only its box jittered. Its embedding is then computed once per round, and
    a step costs the decoder's forward and backward only. ``usable(model)`` is false while any
    encoder parameter trains (the offline recipe), and the memo is then not consulted.

    Args:
        capacity: embeddings kept (4 MiB each for a 256-channel 64 x 64 embedding).
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def usable(model: nn.Module) -> bool:
        inner = unwrap(model)
        return not any(param.requires_grad for param in inner.image_encoder.parameters()) and \
            not any(block.training for block in inner.conmoae_blocks)

    def embeddings(self, model: MedSegXModel, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``(B, C, g, g)`` embeddings of ``images`` (B, 3, 256, 256) under ``context`` (B, 5)."""
        keys = [(content_key(image.detach().cpu().numpy()), tuple(row.tolist())) for image, row in zip(images, context)]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        if missing:
            with torch.no_grad():
                encoded, _ = model.encode(images[missing], context[missing])
            for row, i in enumerate(missing):
                self._entries[keys[i]] = encoded[row]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = []
        for key in keys:
            self._entries.move_to_end(key)
            rows.append(self._entries[key])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return torch.stack(rows)


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor], memo: EncoderMemo | None):
    """``(logits, iou)`` of a batch: the whole model, or the decoder on ``memo``'s embeddings."""
    if memo is not None and EncoderMemo.usable(model):
        inner = unwrap(model)
        embeddings = memo.embeddings(inner, batch["image"], batch["context"])
        return inner.decode(embeddings, batch["box"], None, batch["context"])
    logits, iou, _ = model(batch["image"], batch["box"], batch["context"])
    return logits, iou


@dataclass
class TrainingLoss:
    """One forward pass of a training batch.

    Attributes:
        objective: ``(B,)`` per-sample loss with its graph (Dice + BCE of the best mask, plus
            the weighted IoU-head loss); back-propagate a reduction of it.
        logits: ``(B, 3, 256, 256)`` float mask logits, detached.
        mask_index: ``(B,)`` long, the mask that gave each sample's minimum.
        label: ``(B, 1, 256, 256)`` the batch's labels on the step's device.
    """

    objective: torch.Tensor
    logits: torch.Tensor
    mask_index: torch.Tensor
    label: torch.Tensor

    @property
    def pred(self) -> torch.Tensor:
        """``(B, 1, 256, 256)`` float {0, 1}: the mask that gave each sample's minimum."""
        rows = torch.arange(self.logits.shape[0], device=self.logits.device)
        return (self.logits[rows, self.mask_index] > 0).float()[:, None]


def training_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_function: DiceBCEMinLoss | None = None,
                  device: torch.device | str = "cpu", amp: bool = False,
                  iou_loss_weight: float = 0.0, memo: EncoderMemo | None = None) -> TrainingLoss:
    """Forward a batch of items in train mode and compute the per-sample objective (no backward).

    Args:
        model: ``MedSegXModel`` or its ``DistributedDataParallel`` wrapper (put in
            ``set_train_mode`` here).
        batch: ``{"image": (B, 3, 256, 256) normalised and padded, "label": (B, 1, 256, 256),
            "box": (B, 4) XYXY 256 frame, "context": (B, 5)}`` (``medsegx.items``).
        loss_function: its ``per_mask`` is used, whatever its reduction (default
            ``DiceBCEMinLoss()``).
        device: where the step runs.
        amp: bfloat16 autocast on CUDA (ignored elsewhere).
        iou_loss_weight: weight of MSE(predicted IoU, actual IoU) over the 3 masks (0: off).
        memo: an ``EncoderMemo`` for a round with a frozen encoder (ignored otherwise).
    """
    loss_function = loss_function or DiceBCEMinLoss()
    set_train_mode(model)
    batch = to_device(batch, device)
    label = batch["label"]
    with autocast(device, amp):
        logits, iou_pred = _forward(model, batch, memo)
    objective, mask_index = loss_function.per_mask(logits.float(), label).min(dim=1)
    logits = logits.detach().float()
    if iou_loss_weight > 0:
        iou_loss = F.mse_loss(iou_pred.float(), mask_iou(logits, label), reduction="none").mean(dim=1)
        objective = objective + iou_loss_weight * iou_loss
    return TrainingLoss(objective, logits, mask_index, label)


def train_step(model: nn.Module, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               loss_function: DiceBCEMinLoss | None = None, device: torch.device | str = "cpu",
               amp: bool = False, iou_loss_weight: float = 0.0,
               memo: EncoderMemo | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch: ``training_loss``, its batch mean back-propagated, one update.

    Returns:
        ``{"loss": scalar tensor (detached), "pred": (B, 1, 256, 256) float {0, 1} of the mask
        that gave the minimum, "label": (B, 1, 256, 256), "mask_index": (B,) long}``.
    """
    optimizer.zero_grad(set_to_none=True)
    output = training_loss(model, batch, loss_function, device, amp, iou_loss_weight, memo)
    loss = output.objective.mean()
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "pred": output.pred, "label": output.label, "mask_index": output.mask_index}


@torch.no_grad()
def predict_batch(model: MedSegXModel, batch: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                  amp: bool = False, memo: EncoderMemo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode forward: ``(logits (B, 3, 256, 256) float, predicted IoU (B, 3))``."""
    model = unwrap(model).eval()
    batch = to_device(batch, device)
    with autocast(device, amp):
        logits, iou = _forward(model, batch, memo)
    return logits.float(), iou.float()


def val_step(model: MedSegXModel, batch: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
             amp: bool = False, memo: EncoderMemo | None = None) -> dict[str, torch.Tensor]:
    """Validation on a batch (exact boxes): the mask the predictor would return.

    The output is chosen as the infer task chooses it for a box (``Predictor``'s
    ``select="box_fit"``, ``medsegx.predictor.box_fit_choice``: the highest predicted IoU unless
    its mask's bounding box misfits the box); the IoU choice and the oracle (best Dice of the
    three, the paper's protocol) are reported beside it. Dice is computed on the 256 x 256 grid,
    sigmoid > 0.5.

    Returns:
        ``{"pred": (B, 1, 256, 256) float {0, 1} (the served choice), "label", "dice": (B,) of the
        served choice, "dice_iou": (B,) of the IoU choice, "dice_oracle": (B,), "chosen": (B,) long}``.
    """
    logits, iou = predict_batch(model, batch, device, amp, memo)
    label = batch["label"].to(logits.device)
    per_mask = dice_per_mask(logits, label)
    cpu_logits, cpu_iou = logits.cpu().numpy(), iou.cpu().numpy()
    chosen = torch.tensor([box_fit_choice(cpu_logits[i], cpu_iou[i], batch["box"][i].cpu().numpy(),
                                          batch["valid_hw"][i].tolist(), float(batch["scale"][i]))
                           for i in range(logits.shape[0])], device=logits.device)
    rows = torch.arange(logits.shape[0], device=logits.device)
    pred = (logits[rows, chosen] > 0).float()[:, None]
    return {"pred": pred, "label": label, "dice": per_mask[rows, chosen], "dice_iou": per_mask[rows, iou.argmax(dim=1)],
            "dice_oracle": per_mask.max(dim=1).values, "chosen": chosen}
