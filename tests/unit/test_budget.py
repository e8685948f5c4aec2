"""The fine-tuning budget (``medsegx.budget``): steps grow with the labels, validation slices, early stop."""

from __future__ import annotations

import math

import pytest
import torch

from medsegx.budget import EarlyStop, FinetuneBudget, split_for_validation
from medsegx.build import build_model
from medsegx.slices import StructureBalancedSampler


def test_steps_grow_with_the_labelled_slices_up_to_the_ceiling():
    budget = FinetuneBudget(base_steps=8, steps_per_slice=6, max_steps=50, min_epoch_steps=4)
    steps = [budget.steps(n) for n in (1, 2, 4, 8, 100)]
    assert steps == [14, 20, 32, 50, 50]
    for slices in (1, 2, 4, 7, 30):
        plan = budget.plan(slices, slices_per_epoch=min(slices, 8))
        assert plan.epoch_steps == max(4, min(slices, 8))
        assert plan.epochs == math.ceil(budget.steps(slices) / plan.epoch_steps)
        assert plan.steps == plan.epochs * plan.epoch_steps >= budget.steps(slices)
    assert budget.plan(16, slices_per_epoch=16, batch_size=4).epoch_steps == 4
    assert budget.plan(1, slices_per_epoch=1).first_stop_epoch == 2  # base_steps 8 = 2 epochs of 4
    assert FinetuneBudget(base_steps=48, steps_per_slice=8).plan(8, 8).first_stop_epoch == 6
    assert FinetuneBudget(base_steps=0).plan(1, 1).first_stop_epoch == 1
    # validating on the training slices alone: the whole budget, no early stop
    assert budget.plan(4, 4, held_out=False).patience == 0 and budget.plan(4, 4).patience == budget.patience
    assert "no early stop" in budget.plan(4, 4, held_out=False).describe()
    with pytest.raises(ValueError, match="train_slices=0"):
        budget.plan(0, 0)
    with pytest.raises(ValueError, match="min_epoch_steps"):
        FinetuneBudget(min_epoch_steps=0)


def test_budget_from_a_train_request_overrides_only_its_own_fields():
    budget = FinetuneBudget.from_request({"steps_per_slice": "3", "max_steps": 40, "lr": 0.1})
    assert (budget.steps_per_slice, budget.max_steps, budget.base_steps) == (3, 40, FinetuneBudget.base_steps)


def test_small_structures_validate_on_their_training_slices_large_ones_hold_out_every_5th():
    structures = ["a"] * 10 + ["b"] * 3
    train, val = split_for_validation(structures, holdout_min_slices=8)
    assert val == [2, 7, 10, 11, 12]  # a: every 5th from the 3rd; b: all three (also trained on)
    assert train == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 12]


def test_sampler_repeats_a_single_slice_to_fill_an_epoch():
    sampler = StructureBalancedSampler(["a", "b"], max_per_structure=8, seed=0, min_length=5)
    assert len(sampler) == 5
    drawn = list(sampler)
    assert len(drawn) == 5 and set(drawn) == {0, 1}
    assert len(list(StructureBalancedSampler(["a"] * 6, max_per_structure=8, min_length=4))) == 6


def test_early_stop_keeps_the_best_weights_and_stops_after_patience():
    torch.manual_seed(0)
    model = build_model("tiny_vit", pretrained=False)
    key = "mask_decoder.iou_token.weight"
    stop = EarlyStop(patience=2)
    assert stop.update(0.5, 1, model) is False
    best = model.state_dict()[key].clone()
    with torch.no_grad():
        model.state_dict()[key].add_(1.0)
    assert stop.update(0.5, 2, model) is False  # equal is not better
    assert stop.update(float("nan"), 3, model) is True  # second epoch without improvement
    assert (stop.best, stop.best_epoch) == (0.5, 1)
    stop.restore(model)
    assert torch.equal(model.state_dict()[key], best)
    never = EarlyStop(patience=0)
    assert not any(never.update(0.1, epoch, model) for epoch in range(1, 6))
    late = EarlyStop(patience=1, first_epoch=3)  # the dip of a round's first steps is never kept
    assert late.update(0.9, 1, model) is False and late.update(0.1, 2, model) is False
    assert late.best is None and late.best_weights is None
    assert late.update(0.5, 3, model) is False and (late.best, late.best_epoch) == (0.5, 3)
    assert late.update(0.4, 4, model) is True
    unvalidated = EarlyStop(patience=1)
    assert unvalidated.update(None, 1, model) is False and unvalidated.update(None, 2, model) is False
    assert unvalidated.best_epoch == 2  # nothing to validate on: the last epoch is kept
