"""How long an in-loop fine-tuning round trains, what it validates on, and when it stops.

One policy for every way of fine-tuning on a few labelled slices: the app's train task
(``apps/medsegx/lib/trainers/medsegx.py``, MONAI's ignite engines) and the few-shot benchmark
(``bench/finetune_curve.py``, a plain loop over the same ``medsegx.steps.train_step``) both
take their step count, epoch length, validation slices and early stop from here.

- **Steps grow with the labels**: ``base_steps + steps_per_slice * n`` optimiser steps for
  ``n`` training slices, at most ``max_steps`` (a fixed step count either under-trains many
  labels or over-fits one).
- **Epochs** are at least ``min_epoch_steps`` steps (a structure with one labelled slice sees
  it several times per epoch, each time with another box jitter), so validation, which runs
  once per epoch, costs a bounded share of the round.
- **Validation**: a structure with at least ``holdout_min_slices`` labelled slices gives
  every 5th of them to validation; below that every labelled slice is needed for training,
  so the structure validates on its training slices (exact boxes, eval mode: it measures
  the fit and stops a round that has stopped improving or diverges).
- **Early stop**: after ``patience`` epochs whose validation Dice did not beat the best; the
  best-validating weights are what the round returns (``EarlyStop.best_weights``). Only with
  held-out slices: a round that validates on its training slices alone runs its whole budget
  (``plan(held_out=False)``: patience 0), since the fit of the training slices says nothing of
  the other slices and its epoch-to-epoch noise stopped rounds at random (CT pancreas, 4 slices,
  seed 0: stopped at 68 of 80 steps, 0.739 on the other slices vs 0.769 with 2 slices; AAL
  amygdala, 8 slices: 88 of 112). Not before
  ``base_steps``: the first steps of a round lower the Dice before they raise it (AdamW's first
  updates move every weight by about the learning rate), so an epoch inside them is never
  kept as the best and does not count towards the patience (``BudgetPlan.first_stop_epoch``).

The defaults come from Dice against optimiser steps on real volumes (CT pancreas and spleen,
AAL hippocampus and caudate; 1, 2, 4 and 8 labelled slices; Dice of the volume's other slices
every 16 steps, no early stop): 16-32 steps often sit in that dip (spleen, 4 slices: 0.901 at 16
steps, 0.945 at 48, 0.956 at 80, zero-shot 0.933), and the curves flatten between 64 and 112
steps. The earlier 8 + 6 per slice stopped 4-slice rounds in the dip.

A structure gives slices to validation from 16 labelled slices on (it was 8): with 8, the 1-2
held-out slices chose the stopping epoch by noise (``bench/finetune_curve.py``, seeds 0 and 1,
CT pancreas and AAL hippocampus: 8-slice rounds stopped after 78-90 of 96 steps, trained on 6
slices, and ended below the 4-slice round on 2 of the 4 curves).

Why the single-slice round fell below zero-shot (AAL hippocampus, k = 1, seeds 0-2: the labelled
slice is 74, 46 or 81 of 44..83; Dice of 16 other slices, zero-shot 0.632, this recipe 0.595):
the paper's box jitter, 0..19 px per side, on a structure whose box is 16 x 9 px in the 256
frame. The round learnt masks inside boxes several times the structure's size and under-drew
the tight boxes it was scored on. Jittering by a tenth of the box's side
(``INLOOP_BOX_JITTER_FRACTION``) lifts k = 1 to 0.730 (box_fit choice, zero-shot 0.675). Before
that was found, these were tried and left out (the end slices seemed to teach a shape the other
slices do not have, seed 1: 0.533):

- shrinking the tuned decoder toward the served one (``base + a * (tuned - base)``, WiSE-FT):
  mean 0.627 / 0.620 / 0.609 at a = 0.25 / 0.5 / 0.75; at k >= 2 it lowered the Dice a little
  (k = 8: 0.649 / 0.674 / 0.685 vs 0.689), and on the CT pancreas it lowered every k (seed 0,
  k = 1: 0.733 at a = 0.5 vs 0.766);
- training the served mask instead of the minimum over the three (the same token here: 0.595),
  or all three masks (0.555), or also teaching the IoU head (``iou_loss_weight`` 1: 0.585);
- choosing, for a tuned structure, the output token that fits its labelled slices best after the
  round instead of the IoU choice: the same Dice in 9 of 10 rounds (hippocampus seed 0 and CT
  pancreas seed 0, k = 1..8; pancreas seed 1, k = 1, 2), higher in one (hippocampus k = 4:
  0.727 vs 0.668), and no help where k = 1 drops;
- scoring the predictor's ``box_fit`` choice (what the infer task returns for a box) instead of
  the IoU choice: zero-shot 0.675 instead of 0.632 (the IoU head picks token 0, 0.632, where token 1
  gives 0.753), but k = 1 still drops (0.668 / 0.565 / 0.614 over seeds 0-2); amygdala k = 1
  0.674 vs zero-shot 0.668 (IoU choice: 0.663);
- mirroring the labelled slice left-right (image, mask and box, half of the steps; each mirror
  encoded once per round): on the hippocampus k = 1 rose 0.598 -> 0.628 (seed 1's end slice
  0.533 -> 0.646), still under zero-shot 0.632, and k = 2 fell 0.667 -> 0.656; on the CT pancreas
  (no left-right symmetry) k = 1 fell 0.701 -> 0.686 and k = 2 0.691 -> 0.675 (IoU choice,
  seeds 0-2, 16 evaluation slices; the mirror was added to ``bench/finetune_curve.py``'s loop
  for the measurement and not kept).

Since 2026-12-06 the rounds validate, and ``bench/finetune_curve.py`` scores, the mask the infer
task returns for a box (``medsegx.steps.val_step``: the predictor's ``box_fit`` choice) instead of
the IoU choice; the numbers above were measured with the IoU choice where not said otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medsegx.steps import FINETUNE_LR

__all__ = ["INLOOP_BOX_JITTER_FRACTION", "INLOOP_LR", "INLOOP_TRAIN_ADAPTERS", "BudgetPlan", "EarlyStop", "FinetuneBudget", "split_for_validation"]

#: AdamW learning rate of an in-loop round: the paper's fine-tuning rate (``medsegx.steps.FINETUNE_LR``).
#: 1e-4 was tried for short rounds and measured worse on both sides (one CT pancreas slice, 16 steps,
#: everything trained): pancreas 0.604 vs 0.642 at 5e-5 (base 0.627), and the other structures lost
#: 0.077 mean Dice vs 0.020 at 5e-5 (``bench/regression.py``).
INLOOP_LR = FINETUNE_LR

#: Whether an in-loop round trains the ConMoAE adapters and context embeddings besides the tuned
#: decoder (``MedSegXModel.tune_decoder_for``). Off: on the CT pancreas (seed 0, lr 5e-5) the Dice of
#: the other slices was the same with them frozen (k = 1: 0.642 vs 0.642; k = 8: 0.649 vs 0.647), and
#: frozen they leave every other label's masks exactly as they were, keep a label switch on a cached
#: slice a decoder-only cost, and spare the encoder's backward pass.
INLOOP_TRAIN_ADAPTERS = False

#: Box jitter of an in-loop round: each side of a training box is pushed out by a uniform random
#: 0..b-1 px, b a tenth of the box's extent along that axis (at most ``TRAIN_BOX_JITTER``, 20;
#: ``medsegx.items.jitter_box(max_fraction=...)``). The paper's 0..19 px per side (MedSegDB pretraining)
#: made the training boxes of small structures several times their size (AAL hippocampus: 16 x 9 px
#: in the 256 frame), so a round learnt to draw a small blob inside a loose box and drew it inside the
#: user's tight one: the curve fell below zero-shot at k = 1 (module doc). Mean Dice over seeds 0-2 of
#: the volume's other slices with the exact box / with a box 10 % + 2 px looser per side (a user's
#: loose box), ``bench/finetune_curve.py --cases aal_hippocampus ct_pancreas --loose-eval
#: [--box-jitter 0 | --box-jitter-fraction 0]``; the paper's row is the 2026-12-06 curve (exact box only):
#:
#: =====================  ===============  ===============  ===============  ===============
#: jitter                 hippocampus k=1  hippocampus k=8  pancreas k=2     pancreas k=8
#: =====================  ===============  ===============  ===============  ===============
#: zero-shot (k = 0)      0.675 / 0.627    0.675 / 0.627    0.687 / 0.724    0.687 / 0.724
#: 0..19 px (paper)       0.616            0.698            0.682            0.776
#: none                   0.727 / 0.680    0.849 / 0.739    0.741 / 0.699    0.778 / 0.675
#: a tenth of the side    0.730 / 0.682    0.844 / 0.761    0.718 / 0.722    0.797 / 0.727
#: =====================  ===============  ===============  ===============  ===============
#:
#: No jitter fits exact boxes as well at small k, but its pancreas curve falls from k = 4 (0.799) to
#: k = 8 and falls under zero-shot with loose boxes; a tenth of the side rises with exact boxes on
#: all six curves of ``bench/finetune_curve.py`` and stays near or above zero-shot with loose ones.
INLOOP_BOX_JITTER_FRACTION = 0.1

#: Every HOLDOUT_EVERY-th slice of a structure with enough labelled slices is held out.
HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class BudgetPlan:
    """A round's schedule: ``epochs`` epochs of ``epoch_steps`` optimiser steps (batch ``batch_size``)."""

    train_slices: int
    steps: int
    epoch_steps: int
    epochs: int
    patience: int
    #: the first epoch that may be kept as the best or count towards the patience
    first_stop_epoch: int = 1

    def describe(self) -> str:
        stop = (f"early stop from epoch {self.first_stop_epoch} after {self.patience} epoch(s) without a better "
                "validation Dice" if self.patience else "no early stop (no held-out validation slice)")
        return (f"{self.train_slices} training slice(s) -> {self.steps} steps: {self.epochs} epoch(s) of "
                f"{self.epoch_steps}, {stop}")


@dataclass(frozen=True)
class FinetuneBudget:
    """The data-dependent training budget (defaults sized for a 2-core CPU; see module doc).

    Args:
        base_steps: steps of a round, before those per slice.
        steps_per_slice: steps added per training slice.
        max_steps: ceiling of a round (0: none).
        min_epoch_steps: the shortest epoch, in steps.
        patience: epochs without a better validation Dice before the round stops (0: never).
        holdout_min_slices: a structure needs this many labelled slices to give some to validation.
    """

    base_steps: int = 48
    steps_per_slice: int = 8
    max_steps: int = 160
    min_epoch_steps: int = 4
    patience: int = 3
    holdout_min_slices: int = 16

    def __post_init__(self):
        for name in ("base_steps", "steps_per_slice", "max_steps", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneBudget.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_epoch_steps", "holdout_min_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneBudget.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_request(cls, request: Mapping, **defaults) -> FinetuneBudget:
        """The budget with any of its field names overridden by a request (``POST /train`` body)."""
        values = {**defaults, **{name: int(request[name]) for name in cls.__dataclass_fields__ if name in request}}
        return cls(**values)

    def steps(self, train_slices: int) -> int:
        steps = self.base_steps + self.steps_per_slice * int(train_slices)
        return max(1, min(steps, self.max_steps) if self.max_steps else steps)

    def plan(self, train_slices: int, slices_per_epoch: int, batch_size: int = 1, held_out: bool = True) -> BudgetPlan:
        """The schedule for ``train_slices`` training slices of which an epoch draws ``slices_per_epoch``.

        Args:
            train_slices: labelled slices trained on (all structures).
            slices_per_epoch: distinct slices an epoch's sampler draws (before repeats).
            batch_size: slices per optimiser step.
            held_out: whether validation has a slice that is not trained on; without one the
                round never stops early (patience 0, module doc).
        """
        if train_slices < 1:
            raise ValueError(f"no training slice to plan a round for (train_slices={train_slices})")
        batch_size = max(1, int(batch_size))
        steps = self.steps(train_slices)
        epoch_steps = max(self.min_epoch_steps, math.ceil(max(1, slices_per_epoch) / batch_size))
        epochs = max(1, math.ceil(steps / epoch_steps))
        first_stop = min(epochs, max(1, math.ceil(min(self.base_steps, steps) / epoch_steps)))
        patience = self.patience if held_out else 0
        return BudgetPlan(int(train_slices), epochs * epoch_steps, epoch_steps, epochs, patience, first_stop)


def split_for_validation(structures: Sequence[str], holdout_min_slices: int = FinetuneBudget.holdout_min_slices,
                         every: int = HOLDOUT_EVERY) -> tuple[list[int], list[int]]:
    """Which labelled slices train and which validate, structure by structure.

    Args:
        structures: the structure key of every labelled slice, in slice order per structure.
        holdout_min_slices: below this many slices a structure validates on its training slices.
        every: of a larger structure, every ``every``-th slice (starting at ``every // 2``) is held out.

    Returns:
        ``(train indices, validation indices)`` into ``structures``; an index is in both for
        a structure too small to hold slices out.
    """
    by_structure: dict[str, list[int]] = {}
    for index, key in enumerate(structures):
        by_structure.setdefault(str(key), []).append(index)
    train: list[int] = []
    val: list[int] = []
    for members in by_structure.values():
        if len(members) < holdout_min_slices:
            train.extend(members)
            val.extend(members)
            continue
        held = set(members[every // 2::every])
        train.extend(i for i in members if i not in held)
        val.extend(i for i in members if i in held)
    return sorted(train), sorted(val)


class EarlyStop:
    """Best validation Dice so far, a CPU copy of its trainable weights, and the stop decision.

    Args:
        patience: evaluations without improvement before ``update`` says stop (0: never).
        first_epoch: epochs before this one are neither kept nor counted (``BudgetPlan.first_stop_epoch``).
    """

    def __init__(self, patience: int, first_epoch: int = 1):
        self.patience = int(patience)
        self.first_epoch = int(first_epoch)
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def update(self, score: float | None, epoch: int, model: nn.Module) -> bool:
        """Record an epoch's validation Dice (``None``: nothing to validate on, kept as best; NaN never best).

        Returns:
            True when the round should stop: ``patience`` epochs in a row did not beat the best.
        """
        if epoch < self.first_epoch:
            return False
        improved = score is None or (math.isfinite(score) and (self.best is None or score > self.best))
        if improved:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.best_weights = {key: value.detach().to("cpu", copy=True)
                                 for key, value in _trainable_state(model).items()}
            return False
        self.stale += 1
        return 0 < self.patience <= self.stale

    def restore(self, model: nn.Module) -> None:
        """Load the best-validating weights into ``model`` (a no-op before the first ``update``)."""
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights, strict=False)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return inner.trainable_state_dict()
