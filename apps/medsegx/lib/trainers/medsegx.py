"""The ``medsegx`` train task: in-loop fine-tuning on the datastore's final labels.

Built on MONAI Label's ``BasicTrainTask`` (MONAI's ignite ``SupervisedTrainer`` /
``SupervisedEvaluator``, its stats file, ``ValidationHandler``, early stopping, MLflow and
TensorBoard handlers). What differs from a MONAI Label sample app:

- **Data**: ``lib/labelled_slices.py`` turns every labelled image into per-structure 2D
  slices (a multi-label file is split per structure), prepared exactly as the infer task
  prepares them; validation uses held-out *volumes* (``val_split``); when only one volume is
  labelled, every 5th slice of each structure with 8 or more labelled slices, and the
  training slices themselves for a structure with fewer (``medsegx.budget``). Each epoch
  draws at most ``slices_per_structure`` slices per structure, so an epoch's cost is bounded.
- **Budget** (``medsegx.budget.FinetuneBudget``, shared with ``bench/finetune_curve.py``): the
  round trains ``base_steps + steps_per_slice x`` (training slices) optimiser steps, at most
  ``max_steps``, in epochs of at least ``min_epoch_steps`` steps, validates after every
  epoch and stops early after ``early_stop_patience`` epochs without a better validation
  Dice. An explicit ``max_epochs`` > 0 replaces the step count.
- **Step**: ``medsegx.steps.train_step`` / ``val_step`` as the engines' iteration
  functions: box pushed out by 0..19 px per side, Dice + BCE taken as the minimum over the
  three masks, only adapters / gates / context embeddings / mask decoder trained (the
  encoder runs forward, frozen). Validation Dice is that of the mask the infer task would
  return (chosen by predicted IoU); the oracle Dice is logged beside it.
- **Publishing**: nothing is written while training runs. When the run completes (budget
  spent or early stop) the best-validating weights are published to ``model/medsegx.pth``
  with ``medsegx.checkpoint.publish_checkpoint`` (official MedSegX layout + metadata,
  temporary file then rename; the replaced file is kept as ``model/medsegx.prev.pth``),
  provided they beat the served model's validation Dice measured before the first epoch
  (``publish: "improved"``, default) or always (``"always"``). A run that fails or is
  stopped publishes nothing. The infer task's model store sees the new file on its next
  request.
- **CPU**: in the background process MONAI Label starts for training, torch uses
  ``num_threads`` threads (default 1) and the process lowers its priority (``nice``, and
  ``SCHED_IDLE`` on Linux: ``lib/background.py``), so inference in the server stays responsive.
  Before every training and validation step the round also waits while the server has an infer
  request running or waiting, or ended less than 0.3 s ago (``yield_to_infer``,
  ``lib/interactive.py``; at most ``yield_cap_s``, 30 s, at a time); the time it waited is in the epoch lines and
  in the stats (``yielded_s``). On a GPU (``--conf device cuda``) the same code runs there, with
  bfloat16 autocast (``amp``).

Status: ``GET /train/`` shows the run's state and its last log lines (one summary line per
epoch: loss, validation Dice, best); ``/info`` ``train_stats`` holds the metrics and the
``medsegx`` block (baseline Dice, what was published, the training set, skipped files).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from ignite.metrics import Average
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer

from medsegx.budget import INLOOP_BOX_JITTER_FRACTION, INLOOP_LR, INLOOP_TRAIN_ADAPTERS, BudgetPlan, EarlyStop, FinetuneBudget
from medsegx.checkpoint import publish_checkpoint
from medsegx.items import TRAIN_BOX_JITTER
from medsegx.losses import DiceBCEMinLoss
from medsegx.metrics import finite_or_none
from medsegx.runtime import prepare_ir
from medsegx.slices import StructureBalancedSampler
from medsegx.steps import FINETUNE_WEIGHT_DECAY, EncoderMemo, build_optimizer, train_step, val_step
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.background import BACKGROUND_NICE, BACKGROUND_SCHED_IDLE, limit_background_cpu
from lib.interactive import YIELD_CAP_S, YIELD_GRACE_S, InteractiveYield, marker_path
from lib.labelled_slices import BuildReport, SliceSetBuilder, hold_out_slices, labelled_volumes, split_volumes
from lib.model_store import ModelStore, configured_runtime_mode
from lib.trainers.item_transforms import RandJitterBoxd, ToModelInputd

logger = logging.getLogger(__name__)

PUBLISH_POLICIES = ("improved", "always")


def _decollate(output: dict[str, torch.Tensor], keys: tuple[str, ...], shared: tuple[str, ...] = ()) -> list[dict]:
    """Batch dict -> list of per-sample dicts (MONAI's layout for ``from_engine``)."""
    batch = output["pred"].shape[0]
    return [{**{key: output[key][i] for key in keys}, **{key: output[key] for key in shared}} for i in range(batch)]


class MedSegXTrain(BasicTrainTask):
    """Fine-tune ConMoAE-SAM on the datastore's final labels and publish to ``publish_path``.

    Args:
        store: the process's model store (``lib/model_store.py``): training starts from a copy
            of the model it serves; its settings give the device and the tracking URI.
        publish_path: where the fine-tuned checkpoint goes (the TaskConfig's last ``path``,
            ``model/medsegx.pth``, which the model store then serves).
        output_dir: MONAI Label's run folder (stats file, logs), ``model/<name>``.
        app_labels: the app's label map (name -> value), the last source of label names.
        description: shown in ``/info``.
        config: overrides of the request defaults below.

    Request keys (``POST /train/medsegx`` JSON body; defaults in ``/info``):
        images: labelled image ids to train on (default: all); val_images: the ids held out
        for validation (default: ``val_split`` of them, at random); the budget's
        base_steps, steps_per_slice, max_steps, min_epoch_steps, holdout_min_slices and
        early_stop_patience (``medsegx.budget``); max_epochs (0: from the budget),
        train_batch_size, val_batch_size, lr, weight_decay,
        slices_per_structure (drawn per epoch), val_slices_per_structure,
        max_slices_per_structure and max_cached_slices (candidate slices kept in memory, per
        structure and in all), min_pixels, box_jitter and box_jitter_fraction, num_threads, nice, sched_idle,
        yield_to_infer (pause between steps while the server has interactive work),
        yield_grace_s and yield_cap_s (``lib/interactive.py``), publish
        ("improved" | "always"), seed, amp, tracking ("mlflow" | "None"), tracking_uri.
    """

    def __init__(self, store: ModelStore, publish_path: str | os.PathLike, output_dir: str | os.PathLike,
                 app_labels: dict[str, int] | None = None, description: str = "Fine-tune MedSegX (adapters, gates, context embeddings, mask decoder) "
                                    "on the final labels", config: dict[str, Any] | None = None):
        self.store = store
        settings = store.settings
        self.app_labels = app_labels if app_labels is not None else {}
        self.publish_path = Path(publish_path)
        gpu = settings.device.startswith("cuda")
        defaults = {
            "name": "train_01",
            "device": settings.device,
            "multi_gpu": False,
            "max_epochs": 0,  # 0: epochs from the budget below
            "early_stop_patience": FinetuneBudget.patience,
            "base_steps": FinetuneBudget.base_steps,
            "steps_per_slice": FinetuneBudget.steps_per_slice,
            "max_steps": 2000 if gpu else FinetuneBudget.max_steps,
            "min_epoch_steps": FinetuneBudget.min_epoch_steps,
            "holdout_min_slices": FinetuneBudget.holdout_min_slices,
            "val_split": 0.2,
            "train_batch_size": 4 if gpu else 1,
            "val_batch_size": 4 if gpu else 1,
            "lr": INLOOP_LR,
            "weight_decay": FINETUNE_WEIGHT_DECAY,
            "train_adapters": INLOOP_TRAIN_ADAPTERS,
            "slices_per_structure": 16 if gpu else 8,
            "val_slices_per_structure": 8 if gpu else 2,
            "max_slices_per_structure": 64,
            "max_cached_slices": 4096,
            "min_pixels": 10,
            "box_jitter": TRAIN_BOX_JITTER,
            "box_jitter_fraction": INLOOP_BOX_JITTER_FRACTION,
            "num_threads": 1,
            "nice": BACKGROUND_NICE,
            "sched_idle": BACKGROUND_SCHED_IDLE,
            "yield_to_infer": True,
            "yield_grace_s": YIELD_GRACE_S,
            "yield_cap_s": YIELD_CAP_S,
            "publish": "improved",
            "seed": 0,
            "amp": True,
            "dataset": "Dataset",
            "dataloader": "DataLoader",
        }
        defaults.update(config or {})
        super().__init__(
            model_dir=str(output_dir),
            description=description,
            config=defaults,
            amp=False,  # the iteration functions handle autocast themselves (bfloat16 on CUDA)
            load_path=None,
            publish_path=None,  # published by FineTuneMonitor, atomically, in the MedSegX layout
            tracking_uri=settings.tracking_uri or None,
        )
        self._config["tracking_uri"] = ""  # resolved per run from the app's settings (compat.py)
        self._result: dict[str, Any] = {}  # what the last run published (FineTuneMonitor)

    # -- entry ------------------------------------------------------------------------------
    def __call__(self, request, datastore):
        limit_background_cpu(int(request.get("num_threads", self._config["num_threads"])),
                             int(request.get("nice", self._config["nice"])),
                             _flag(request, "sched_idle", self._config["sched_idle"]))
        self.interactive_yield(request)  # FineTuneMonitor's; a bad value fails before any work
        publish = request.get("publish", self._config["publish"])
        if publish not in PUBLISH_POLICIES:
            raise ValueError(f"train request publish={publish!r} is not one of {', '.join(PUBLISH_POLICIES)}")
        if not request.get("tracking_uri"):
            request = {**request, "tracking_uri": self._tracking_uri or _monailabel_tracking_uri()}
        return super().__call__(request, datastore)

    def interactive_yield(self, request) -> InteractiveYield | None:
        """The round's waiter for the server's infer requests (``None`` with ``yield_to_infer`` false)."""
        if not _flag(request, "yield_to_infer", self._config["yield_to_infer"]):
            return None
        # the server writes the marker into the app's model folder; this process built the same app
        return InteractiveYield(marker_path(self.store.settings.model_dir),
                                grace_s=float(request.get("yield_grace_s", self._config["yield_grace_s"])),
                                cap_s=float(request.get("yield_cap_s", self._config["yield_cap_s"])))

    def pre_process(self, request, datastore):
        """The labelled volumes (one entry each; ``images`` restricts them); slices come after the split."""
        volumes = labelled_volumes(datastore)
        wanted = request.get("images")
        if wanted:
            wanted = [wanted] if isinstance(wanted, str) else list(wanted)
            missing = sorted(set(wanted) - {v["image_id"] for v in volumes})
            if missing:
                logger.warning("medsegx train: images without a final label ignored: %s", ", ".join(missing))
            volumes = [v for v in volumes if v["image_id"] in set(wanted)]
        logger.info("medsegx train: %d labelled image(s): %s", len(volumes), ", ".join(v["image_id"] for v in volumes))
        return volumes

    def partition_datalist(self, context: Context, shuffle=False):
        """Held-out volumes for validation (``val_images``, else ``val_split``); the slice samples of both sides."""
        request = context.request
        val_ids = request.get("val_images")
        if val_ids:
            val_ids = {val_ids} if isinstance(val_ids, str) else set(val_ids)
            train_volumes = [v for v in context.datalist if v["image_id"] not in val_ids]
            val_volumes = [v for v in context.datalist if v["image_id"] in val_ids]
        else:
            train_volumes, val_volumes = split_volumes(context.datalist, float(request.get("val_split", 0.2)),
                                                       int(request.get("seed", 0)))
        per_volume = int(request.get("max_cached_slices", 4096)) // max(1, len(context.datalist))
        builder = SliceSetBuilder(self.app_labels, int(request.get("min_pixels", 10)),
                                  int(request.get("max_slices_per_structure", 64)), max(8, per_volume))
        report = BuildReport()
        train_samples, _ = builder.build(train_volumes, report)
        val_samples, _ = builder.build(val_volumes, report)
        budget = self.budget(request)
        if not val_samples and float(request.get("val_split", 0.2)) > 0:
            train_samples, val_samples = hold_out_slices(train_samples, budget.holdout_min_slices)
            if val_samples:
                logger.warning("medsegx train: no held-out volume to validate on; validating on every 5th slice of "
                               "each structure with %d or more slices, on the training slices of the others "
                               "(%d slices)", budget.holdout_min_slices, len(val_samples))
        if not train_samples:
            raise ValueError("medsegx train: no usable training slice in the datastore's final labels"
                             + (f" (skipped: {'; '.join(report.skipped)})" if report.skipped else ""))
        context.build_report = report
        held_out = {(s.volume_id, s.structure, s.slice_index) for s in val_samples} - {
            (s.volume_id, s.structure, s.slice_index) for s in train_samples}
        context.plan = self.plan(context, budget, train_samples, held_out=bool(held_out))
        logger.info("medsegx train: %d training slice(s) from %s; %d validation slice(s) from %s",
                    len(train_samples), sorted({s.volume_id for s in train_samples}),
                    len(val_samples), sorted({s.volume_id for s in val_samples}))
        as_dicts = [dict(vars(sample)) for sample in train_samples], [dict(vars(sample)) for sample in val_samples]
        return as_dicts

    # -- budget -----------------------------------------------------------------------------
    def budget(self, request) -> FinetuneBudget:
        """The request's ``FinetuneBudget`` (its patience is MONAI Label's ``early_stop_patience``)."""
        budget = FinetuneBudget.from_request(request)
        patience = int(request.get("early_stop_patience", budget.patience))
        return FinetuneBudget(**{**vars(budget), "patience": max(0, patience)})

    def plan(self, context: Context, budget: FinetuneBudget, train_samples, held_out: bool = True) -> BudgetPlan:
        """The round's epochs from the number of training slices; an explicit ``max_epochs`` wins.

        ``held_out``: validation has slices not trained on; without, the round runs its whole
        budget (``FinetuneBudget.plan``)."""
        per_structure = int(context.request.get("slices_per_structure", 8))
        counts: dict[str, int] = {}
        for sample in train_samples:
            counts[sample.structure] = counts.get(sample.structure, 0) + 1
        per_epoch = sum(min(n, per_structure) if per_structure > 0 else n for n in counts.values())
        plan = budget.plan(len(train_samples), per_epoch, context.train_batch_size, held_out)
        explicit = int(context.request.get("max_epochs") or 0)
        if explicit > 0:  # MONAI Label's meaning: that many passes over the drawn slices, no repeats
            epoch_steps = math.ceil(max(1, per_epoch) / max(1, context.train_batch_size))
            plan = BudgetPlan(plan.train_slices, explicit * epoch_steps, epoch_steps, explicit, plan.patience)
        context.max_epochs = plan.epochs
        # the monitor's EarlyStop stops the round; BasicTrainTask.finalize would add ignite's too
        context.request["early_stop_patience"] = 0
        logger.info("medsegx train: budget: %s", plan.describe())
        return plan

    # -- model ------------------------------------------------------------------------------
    def network(self, context: Context):
        """A copy of the served model (the newest checkpoint, as the infer task loads it), with the
        tuned decoder serving the labelled structures' contexts (``MedSegXModel.tune_decoder_for``):
        what this round learns in the decoder reaches those structures only."""
        with self.store.use() as loaded:
            model = copy.deepcopy(loaded.predictor.model)
            context.parent_version = loaded.version
            checkpoint = loaded.checkpoint
        contexts = {tuple(sample["context"]) for sample in [*context.train_datalist, *context.val_datalist]}
        adapters = _flag(context.request, "train_adapters", self._config["train_adapters"])
        model.tune_decoder_for(contexts, adapters=adapters)
        context.encoder_memo = EncoderMemo()  # frozen encoder: each slice is encoded once per round
        logger.info("medsegx train: starting from %s (%s); tuned decoder for %d context(s)", context.parent_version,
                    checkpoint or "backbone weights", len(model.tuned_context_set()))
        return model

    def optimizer(self, context: Context):
        return build_optimizer(context.network, float(context.request.get("lr", INLOOP_LR)),
                               float(context.request.get("weight_decay", FINETUNE_WEIGHT_DECAY)))

    def loss_function(self, context: Context):
        return DiceBCEMinLoss()

    def lr_scheduler_handler(self, context: Context):
        return None  # constant learning rate (paper fine-tuning recipe)

    def load_path(self, output_dir, pretrained=True):
        return None  # the network starts from the served checkpoint (``network``), not a MONAI snapshot

    # -- data -------------------------------------------------------------------------------
    def train_pre_transforms(self, context: Context):
        return [ToModelInputd(context.network.normalize, context.device),
                RandJitterBoxd(int(context.request.get("box_jitter", self._config["box_jitter"])),
                               float(context.request.get("box_jitter_fraction", self._config["box_jitter_fraction"])))]

    def val_pre_transforms(self, context: Context):
        return [ToModelInputd(context.network.normalize, context.device)]

    def train_post_transforms(self, context: Context):
        return None

    def val_post_transforms(self, context: Context):
        return None

    def val_inferer(self, context: Context):
        return SimpleInferer()  # unused: val_iteration_update runs the model

    def _loader(self, context: Context, datalist, transforms, batch_size: int, per_structure: int, shuffle: bool,
                min_length: int = 0):
        dataset = Dataset(datalist, self._validate_transforms(transforms))
        sampler = StructureBalancedSampler([item["structure"] for item in datalist], per_structure,
                                           seed=int(context.request.get("seed", 0)), shuffle=shuffle,
                                           min_length=min_length)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)

    def train_data_loader(self, context: Context, num_workers=0, shuffle=True):
        loader = self._loader(context, context.train_datalist, self.train_pre_transforms(context),
                              context.train_batch_size, int(context.request.get("slices_per_structure", 8)), True,
                              min_length=context.plan.epoch_steps * context.train_batch_size)
        logger.info("medsegx train: %d slice(s) per epoch", len(loader.sampler))
        return loader

    def val_data_loader(self, context: Context, num_workers=0):
        loader = self._loader(context, context.val_datalist, self.val_pre_transforms(context),
                              context.val_batch_size, int(context.request.get("val_slices_per_structure", 2)), False)
        context.val_loader = loader
        logger.info("medsegx train: %d validation slice(s)", len(loader.sampler))
        return loader

    # -- steps and metrics ------------------------------------------------------------------
    def train_iteration_update(self, context: Context):
        amp = bool(context.request.get("amp", True))

        def iteration(engine, batchdata):
            output = train_step(engine.network, batchdata, engine.optimizer, engine.loss_function, context.device, amp,
                                memo=context.encoder_memo)
            return _decollate(output, ("pred", "label"), shared=("loss",))

        return iteration

    def val_iteration_update(self, context: Context):
        amp = bool(context.request.get("amp", True))

        def iteration(engine, batchdata):
            output = val_step(engine.network, batchdata, context.device, amp, memo=context.encoder_memo)
            return _decollate(output, ("pred", "label", "dice", "dice_oracle"))

        return iteration

    def train_key_metric(self, context: Context):
        return {self.TRAIN_METRIC_MEAN_DICE: MeanDice(include_background=True,
                                                      output_transform=from_engine(["pred", "label"]))}

    def val_key_metric(self, context: Context):
        return {self.VAL_METRIC_MEAN_DICE: MeanDice(include_background=True,
                                                    output_transform=from_engine(["pred", "label"]))}

    def val_additional_metrics(self, context: Context):
        # mean of the batch's oracle Dice (the best of the three masks), averaged over batches
        return {"val_dice_oracle": Average(
            output_transform=lambda output: float(torch.stack([o["dice_oracle"] for o in output]).mean()))}

    # -- engines (as BasicTrainTask's, without its full-network CheckpointSavers) ----------
    def _create_evaluator(self, context: Context):
        if not context.val_datalist:
            return None
        return SupervisedEvaluator(
            device=context.device,
            val_data_loader=self.val_data_loader(context),
            network=context.network,
            inferer=self.val_inferer(context),
            key_val_metric=self.val_key_metric(context),
            additional_metrics=self.val_additional_metrics(context),
            val_handlers=self.val_handlers(context),
            iteration_update=self.val_iteration_update(context),
            decollate=False,
        )

    def _create_trainer(self, context: Context):
        return SupervisedTrainer(
            device=context.device,
            max_epochs=context.max_epochs,
            train_data_loader=self.train_data_loader(context),
            network=context.network,
            optimizer=context.optimizer,
            loss_function=self.loss_function(context),
            inferer=SimpleInferer(),
            key_train_metric=self.train_key_metric(context),
            train_handlers=self.train_handlers(context),
            iteration_update=self.train_iteration_update(context),
            decollate=False,
        )

    def finalize(self, context: Context):
        super().finalize(context)  # stats file + early stopping on the validation Dice
        context.monitor = FineTuneMonitor(self, context)
        context.monitor.attach()

    def train(self, rank, world_size, request, datalist):
        stats = super().train(rank, world_size, request, datalist)
        stats["medsegx"] = self._result  # set by FineTuneMonitor on completion
        if self._stats_path and os.path.exists(self._stats_path):
            with open(self._stats_path) as handle:
                saved = json.load(handle)
            saved["medsegx"] = self._result
            with open(self._stats_path, "w") as handle:
                json.dump(saved, handle, indent=2)
        return stats


def _flag(request, key: str, default: bool) -> bool:
    """A true/false request key (JSON booleans; a bool default), or a ``ValueError`` naming it."""
    value = request.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"train request {key}={value!r} must be true or false")
    return value


def _monailabel_tracking_uri() -> str:
    from monailabel.config import settings

    return settings.MONAI_LABEL_TRACKING_URI


class FineTuneMonitor:
    """Baseline validation, best-weights snapshot, per-epoch summary and the final publish.

    Handlers:
        trainer STARTED: validation Dice of the served weights (the baseline to beat).
        trainer and evaluator ITERATION_STARTED (and each baseline batch): wait while the
            server has interactive work (``lib/interactive.py``; ``yield_to_infer``).
        trainer EPOCH_COMPLETED (after validation): ``medsegx.budget.EarlyStop`` keeps a CPU
            copy of the trainable weights when the validation Dice improved (every epoch when
            there is no validation) and stops the run after the plan's patience; one summary line.
        trainer COMPLETED (also after an early stop): publish per the ``publish`` policy.
        trainer EXCEPTION_RAISED: log that the served model stays.
    """

    def __init__(self, task: MedSegXTrain, context: Context):
        self.task = task
        self.context = context
        self.policy = context.request.get("publish", "improved")
        self.baseline: float | None = None
        plan = getattr(context, "plan", None)
        self.stopper = EarlyStop(plan.patience, plan.first_stop_epoch) if plan is not None else EarlyStop(0)
        self.epoch_start = time.time()
        self.epoch_yielded_s = 0.0
        self.task._result = {"published": False}
        self.pause = task.interactive_yield(context.request)

    def attach(self) -> None:
        trainer = self.context.trainer
        trainer.add_event_handler(Events.STARTED, self.measure_baseline)
        if self.pause is not None:
            trainer.add_event_handler(Events.ITERATION_STARTED, self.yield_to_infer)
            if self.context.evaluator is not None:
                self.context.evaluator.add_event_handler(Events.ITERATION_STARTED, self.yield_to_infer)
        trainer.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.end_epoch)
        trainer.add_event_handler(Events.COMPLETED, self.complete)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def yield_to_infer(self, engine=None) -> None:
        """Before a step: wait while the server has interactive work (at most ``yield_cap_s``)."""
        if self.pause is not None:
            self.pause.wait()

    @property
    def yielded_s(self) -> float:
        return self.pause.yielded_s if self.pause is not None else 0.0

    def measure_baseline(self, engine) -> None:
        loader = getattr(self.context, "val_loader", None)
        if loader is None or self.context.evaluator is None:
            return
        start = time.time()
        amp = bool(self.context.request.get("amp", True))
        scores = []
        for batch in loader:
            self.yield_to_infer()
            scores.extend(val_step(self.context.network, batch, self.context.device, amp,
                                   memo=self.context.encoder_memo)["dice"].tolist())
        self.baseline = sum(scores) / len(scores) if scores else None
        logger.info("medsegx train: served model %s: val Dice %.4f on %d slice(s) (%.1f s)",
                    self.context.parent_version, self.baseline or float("nan"), len(scores), time.time() - start)

    def start_epoch(self, engine) -> None:
        self.epoch_start = time.time()
        self.epoch_yielded_s = self.yielded_s

    def end_epoch(self, engine) -> None:
        evaluator = self.context.evaluator
        val_dice = None
        if evaluator is not None:
            val_dice = finite_or_none(evaluator.state.metrics.get(self.task.VAL_METRIC_MEAN_DICE))
            val_dice = float("nan") if val_dice is None else val_dice  # never counts as the best
        stop = self.stopper.update(val_dice, engine.state.epoch, self.context.network)
        loss = engine.state.output[0]["loss"].item() if engine.state.output else float("nan")
        train_dice = finite_or_none(engine.state.metrics.get(self.task.TRAIN_METRIC_MEAN_DICE))
        logger.info(
            "medsegx train: epoch %d/%d loss %.4f train Dice %s val Dice %s (best %s @ epoch %d; served model %s) "
            "%.1f s (yielded %.1f s to infer requests)", engine.state.epoch, engine.state.max_epochs, loss,
            _fmt(train_dice), _fmt(finite_or_none(val_dice)), _fmt(self.best), self.stopper.best_epoch,
            _fmt(self.baseline), time.time() - self.epoch_start, self.yielded_s - self.epoch_yielded_s)
        if stop:
            logger.info("medsegx train: early stop after %d epoch(s) without a better validation Dice",
                        self.stopper.stale)
            engine.terminate()

    @property
    def best(self) -> float | None:
        return finite_or_none(self.stopper.best)

    def complete(self, engine) -> None:
        context = self.context
        result = {
            "published": False,
            "publish_policy": self.policy,
            "parent_model_version": context.parent_version,
            "baseline_val_dice": self.baseline,
            "best_val_dice": self.best,
            "best_epoch": self.stopper.best_epoch,
            "epochs": engine.state.epoch,
            "budget": vars(context.plan) if getattr(context, "plan", None) is not None else None,
            "training_set": context.build_report.as_dict(),
            **self.yield_summary(),
        }
        beats_served = self.best is None or self.baseline is None or self.best > self.baseline
        if self.stopper.best_weights is None:
            result["reason"] = "no epoch completed"
        elif self.policy == "improved" and not beats_served:
            result["reason"] = (f"best val Dice {self.best:.4f} does not beat the served model's {self.baseline:.4f}; "
                                "the served model stays (train with publish='always' to replace it anyway)")
        else:
            self.stopper.restore(context.network)
            metadata = {
                "parent_model_version": context.parent_version,
                "trained_by": "monailabel train task medsegx",
                "run_id": context.run_id,
                "epochs": engine.state.epoch,
                "best_epoch": self.stopper.best_epoch,
                "val_dice": self.best,
                "baseline_val_dice": self.baseline,
                "lr": float(context.request.get("lr", INLOOP_LR)),
                "training_set": {key: value for key, value in context.build_report.as_dict().items()
                                 if key != "skipped"},
            }
            result["graphs_converted_s"] = prepare_serving_graphs(context.network)
            meta = publish_checkpoint(context.network, self.task.publish_path, metadata,
                                      optimizer=context.optimizer, epoch=engine.state.epoch)
            result.update(published=True, model_version=meta["model_version"], checkpoint=str(self.task.publish_path))
        self.task._result = result
        if self.pause is not None:
            logger.info("medsegx train: yielded %.1f s to infer requests (%d pause(s), %d ended at the %.0f s cap)",
                        self.pause.yielded_s, self.pause.pauses, self.pause.capped, self.pause.cap_s)
        if result["published"]:
            logger.info("medsegx train: published model %s to %s (val Dice %s, served model had %s)",
                        result["model_version"], self.task.publish_path, _fmt(self.best), _fmt(self.baseline))
        else:
            logger.info("medsegx train: nothing published: %s", result["reason"])

    def failed(self, engine, error) -> None:
        logger.error("medsegx train: failed (%s: %s); the served model is untouched", type(error).__name__, error)
        self.task._result = {"published": False, "reason": f"{type(error).__name__}: {error}", **self.yield_summary()}
        raise error

    def yield_summary(self) -> dict[str, Any]:
        """The round's waits for infer requests (``yielded_s``, ``yield_pauses``, ``yield_capped``) for the stats."""
        if self.pause is None:
            return {"yielded_s": 0.0, "yield_pauses": 0, "yield_capped": 0}
        return self.pause.summary()


def prepare_serving_graphs(network) -> float | None:
    """Convert the weights about to be published into the server's runtime cache (``medsegx.runtime.prepare_ir``).

    Converting takes ~20 s on 2 cores; done here, in the background process, the server that
    reloads the checkpoint only compiles the graphs (~1 s) instead of serving eager PyTorch
    (~5x slower per request) until its own conversion ends. Skipped with ``MEDSEGX_RUNTIME=eager``;
    a failure costs nothing but that (the server converts as before).

    Returns:
        Seconds spent converting, or ``None`` when nothing was converted.
    """
    if configured_runtime_mode() == "eager":  # the server never exports
        return None
    start = time.perf_counter()
    try:
        folder = prepare_ir(getattr(network, "module", network))
    except Exception as err:  # conversion errors come in many types; the server converts instead
        logger.warning("medsegx train: graphs not converted before publishing (%s: %s); the server will convert them",
                       type(err).__name__, err)
        return None
    if folder is None:
        return None
    seconds = time.perf_counter() - start
    logger.info("medsegx train: converted the published weights' graphs into %s in %.1f s", folder, seconds)
    return round(seconds, 1)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
