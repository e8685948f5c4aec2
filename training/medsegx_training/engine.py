"""One training epoch and one evaluation pass; no files, no process setup.

Both take the model as built by ``medsegx.build`` (optionally wrapped in
``DistributedDataParallel``) and batches of ``medsegx.data.MedSegDBDataset`` items (the one
item format of ``medsegx.items``). The forward pass, the loss over the three masks, the
IoU-head loss, autocast and the train-mode policy are ``medsegx.steps``' (the app's train task
runs the same functions); what is the offline trainer's own is here: gradient accumulation
across micro-batches and DDP ranks, the per-step learning rate, and the reporting metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medsegx.losses import DiceBCEMinLoss
from medsegx.metrics import dice, dice_per_mask, hd95, nsd
from medsegx.steps import predict_batch, set_train_mode, training_loss, unwrap

from medsegx_training.loaders import micro_batch_sizes
from medsegx_training.distributed import DistEnv, all_reduce_sum

logger = logging.getLogger(__name__)


# -- learning rate ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LRSchedule:
    """Per-optimizer-step learning rate.

    ``warmup_cosine`` (the official MedSegX code): linear warmup to ``base_lr`` over
    ``warmup_steps`` (step ``s`` gets ``base_lr * (s + 1) / warmup_steps``), then a cosine
    from ``base_lr`` down to ``min_lr`` at ``total_steps``. ``constant``: ``base_lr`` always.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    kind: str = "warmup_cosine"

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.base_lr
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- training -----------------------------------------------------------------------------------

@dataclass
class EpochStats:
    """What one epoch measured (means over every image of every rank)."""

    loss: float
    dice: float
    steps: int
    images: int
    global_step: int
    step_losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, lr)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    env: DistEnv,
    *,
    global_step: int,
    accumulation: int,
    loss_fn: DiceBCEMinLoss | None = None,
    iou_loss_weight: float = 0.0,
    amp: bool = True,
    max_steps: int | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    progress: bool = False,
    description: str = "train",
) -> EpochStats:
    """Trains one epoch with gradient accumulation.

    An optimizer step covers ``accumulation`` micro-batches per process. Each micro-batch
    back-propagates ``sum of its per-sample losses / images in the step on this rank``, and
    DDP averages over the (equal-sized) ranks, so a step's gradient is the mean over its
    global batch whatever the split into processes and micro-batches; gradients are
    all-reduced only on a step's last micro-batch (``no_sync`` before). A short last step
    (the epoch's remainder) is averaged over the images it has.

    Args:
        model: ``MedSegXModel`` or its DDP wrapper (``medsegx.steps.set_train_mode`` per step).
        loader: from ``medsegx_training.loaders.train_loader`` (``set_epoch`` already called).
        optimizer: over the trainable parameters only.
        schedule: optimizer step -> learning rate, set before every step.
        env: this process.
        global_step: optimizer steps done before this epoch.
        accumulation: micro-batches per optimizer step.
        loss_fn: its ``per_mask`` gives the per-sample loss (default ``DiceBCEMinLoss``).
        iou_loss_weight: weight of MSE(predicted IoU, actual IoU) over the 3 masks (0: off).
        amp: bf16 autocast on GPU.
        max_steps: stop after this many optimizer steps.
        on_step: called on every rank after each step with (step, global mean loss, lr).
        progress: show a tqdm bar (rank 0 only).

    Returns:
        ``EpochStats`` with the global mean loss and oracle Dice over the images trained on.
    """
    sizes = micro_batch_sizes(loader)
    if max_steps is not None:
        sizes = sizes[: max_steps * accumulation]
    step_images = [sum(sizes[start:start + accumulation]) for start in range(0, len(sizes), accumulation)]
    is_ddp = isinstance(model, DistributedDataParallel)
    device = env.device

    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, dice sum, images
    step_totals = torch.zeros(3, dtype=torch.float64, device=device)
    step_losses: list[tuple[int, float, float]] = []
    bar = tqdm(total=len(step_images), desc=description, disable=not (progress and env.is_main),
               dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for index, batch in enumerate(loader):
        if index >= len(sizes):
            break
        cycle, position = divmod(index, accumulation)
        last_in_step = position == accumulation - 1 or index == len(sizes) - 1
        step = global_step + cycle
        if position == 0:
            lr = schedule(step)
            set_lr(optimizer, lr)
        sync = contextlib.nullcontext() if (last_in_step or not is_ddp) else model.no_sync()
        with sync:
            output = training_loss(model, batch, loss_fn, device, amp, iou_loss_weight)
            (output.objective.sum() / step_images[cycle]).backward()
        with torch.no_grad():
            batch_dice = dice_per_mask(output.logits, output.label).max(dim=1).values
            step_totals += torch.stack([output.objective.detach().sum().double(), batch_dice.sum().double(),
                                        torch.tensor(float(len(batch_dice)), dtype=torch.float64, device=device)])
        if not last_in_step:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        all_reduce_sum(step_totals, env)
        totals += step_totals
        step_loss = (step_totals[0] / step_totals[2]).item()
        step_totals.zero_()
        step_losses.append((step, step_loss, lr))
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step}: lower --lr or check the data")
        if on_step is not None:
            on_step(step, step_loss, lr)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
    bar.close()
    images = int(totals[2].item())
    return EpochStats(
        loss=(totals[0] / totals[2]).item() if images else float("nan"),
        dice=(totals[1] / totals[2]).item() if images else float("nan"),
        steps=len(step_images),
        images=images,
        global_step=global_step + len(step_images),
        step_losses=step_losses,
    )


# -- evaluation ---------------------------------------------------------------------------------

def image_metrics(logits: np.ndarray, iou_pred: np.ndarray, gt: np.ndarray, surface: bool = True,
                  nsd_tolerance: float = 2.0) -> dict:
    """Metrics of one image for the oracle and the by-predicted-IoU mask choice.

    Args:
        logits: ``(3, H, W)`` mask logits; a pixel is foreground when ``sigmoid > 0.5``,
            i.e. ``logit > 0``.
        iou_pred: ``(3,)`` predicted IoU of the masks.
        gt: ``(H, W)`` ground truth {0, 1}.
        surface: also compute HD95 and NSD (slower; off for per-epoch validation).
        nsd_tolerance: NSD tolerance in pixels.

    Returns:
        ``mask_oracle`` (the mask with the best Dice, the paper's protocol), ``mask_by_iou``
        (the highest predicted IoU, what a user gets), ``iou_pred_by_iou`` and per choice
        ``dice_*`` (and ``hd95_*`` / ``nsd_*`` with ``surface``).
    """
    gt = gt > 0.5
    masks = logits > 0.0  # sigmoid(x) > 0.5
    dices = [dice(mask, gt) for mask in masks]
    choices = {"oracle": int(np.argmax(dices)), "by_iou": int(np.argmax(iou_pred))}
    row: dict = {"mask_oracle": choices["oracle"], "mask_by_iou": choices["by_iou"],
                 "iou_pred_by_iou": float(iou_pred[choices["by_iou"]])}
    surface_cache: dict[int, tuple[float, float]] = {}
    for name, index in choices.items():
        row[f"dice_{name}"] = dices[index]
        if surface:
            if index not in surface_cache:
                surface_cache[index] = (hd95(masks[index], gt), nsd(masks[index], gt, tolerance=nsd_tolerance))
            row[f"hd95_{name}"], row[f"nsd_{name}"] = surface_cache[index]
    return row


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    env: DistEnv,
    *,
    amp: bool = True,
    surface: bool = True,
    nsd_tolerance: float = 2.0,
    progress: bool = False,
    description: str = "evaluate",
) -> list[dict]:
    """Per-image metrics of this rank's shard (exact boxes, eval mode, no dropout).

    Args:
        model: ``MedSegXModel`` (or DDP wrapper: the inner model is used).
        loader: from ``medsegx_training.loaders.eval_loader`` (jitter 0).
        env: this process.
        amp: bf16 autocast on GPU (logits are compared in float32).
        surface: compute HD95 / NSD besides Dice.
        nsd_tolerance: NSD tolerance in pixels (paper 2).

    Returns:
        One dict per image: ``path`` plus the keys of ``image_metrics``. Gather them over
        ranks with ``medsegx_training.distributed.gather_objects``.
    """
    raw_model = unwrap(model)
    decoder = getattr(raw_model, "mask_decoder", None)
    was_training = decoder is not None and decoder.training  # set_train_mode's mark
    rows: list[dict] = []
    try:
        for batch in tqdm(loader, desc=description, disable=not (progress and env.is_main), dynamic_ncols=True,
                          leave=False):
            logits, iou_pred = predict_batch(raw_model, batch, env.device, amp)
            logits = logits.cpu().numpy()
            iou_pred = iou_pred.cpu().numpy()
            gts = batch["label"][:, 0].numpy()
            for path, image_logits, image_iou, gt in zip(batch["path"], logits, iou_pred, gts):
                rows.append({"path": path, **image_metrics(image_logits, image_iou, gt, surface, nsd_tolerance)})
    finally:
        if was_training:
            set_train_mode(raw_model)
    return rows


def mean_dice(rows: list[dict], env: DistEnv, key: str = "dice_oracle") -> float:
    """Mean of ``key`` over every rank's rows (each image counted once)."""
    totals = torch.tensor([sum(row[key] for row in rows), float(len(rows))], dtype=torch.float64,
                          device=env.device)
    all_reduce_sum(totals, env)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
