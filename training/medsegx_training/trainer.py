"""The training run shared by ``medsegx-pretrain`` and ``medsegx-finetune``.

``run_training(config)`` wires the stages together: process group -> data -> model ->
optimizer and LR schedule -> (resume) -> epochs of ``engine.train_one_epoch`` with
validation, checkpoints and records -> the final official-layout checkpoint.

Output folder::

    config.yaml               the run's configuration
    last.pth                  every epoch, resumable (``--resume auto``)
    best.pth                  best validation epoch (with --val-root)
    medsegx_<backbone>.pth    the final weights (official layout; loads in the app)
    train_steps.csv, history.csv, training_curves.png, tensorboard/
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from medsegx.build import build_model, count_parameters
from medsegx.modeling import MedSegXModel
from medsegx.steps import build_optimizer, set_train_mode

from medsegx_training.config import ConfigError, TrainConfig, build_train_parser, save_config, train_config_from_args
from medsegx_training.loaders import describe_dataset, eval_loader, micro_batch_sizes, shared_dataset, train_loader
from medsegx_training.distributed import (
    DistEnv,
    barrier,
    capture_rng_state,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    seed_everything,
    set_deterministic,
)
from medsegx_training.engine import LRSchedule, evaluate, mean_dice, train_one_epoch
from medsegx_training.reporting import RunRecorder
from medsegx_training.state import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    ResumeState,
    final_checkpoint_name,
    load_resume,
    resolve_resume_path,
    save_training_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced (paths are ``None`` when not written by this run)."""

    output_dir: Path
    epochs_done: int
    global_step: int
    final_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    history: list[dict] = field(default_factory=list)
    step_losses: list[tuple[int, float, float]] = field(default_factory=list)


def configure_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """INFO on rank 0, warnings only on the other ranks (one readable log per run)."""
    logging.basicConfig(level=level if env.is_main else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")


def build_training_model(config: TrainConfig, device: torch.device) -> MedSegXModel:
    """The model with its backbone (and optional MedSegX start) weights, in train mode."""
    model = build_model(config.backbone, sam_checkpoint=config.sam_checkpoint, checkpoint=config.init_checkpoint,
                        device=device, conmoae=config.conmoae, pretrained=not config.backbone.startswith("tiny_"))
    for block in model.conmoae_blocks:
        block.adapter_dropout = config.adapter_dropout
    set_train_mode(model)
    return model


def _run_metadata(config: TrainConfig, env: DistEnv, accumulation: int, train_summary: dict,
                  val_summary: dict | None, epochs_done: int, global_step: int, history: list[dict]) -> dict:
    return {
        "stage": config.stage,
        "config": dataclasses.asdict(config),
        "training_data": train_summary,
        "validation_data": val_summary,
        "world_size": env.world_size,
        "accumulation_steps": accumulation,
        "epochs_done": epochs_done,
        "global_step": global_step,
        "last_epoch": history[-1] if history else None,
        "torch_version": str(torch.__version__),
    }


# Options that may differ between a run and its resumption without changing the recipe.
_RESUME_FREE_OPTIONS = {"resume", "stop_after_epoch", "progress", "num_workers", "tensorboard", "output_dir", "device"}


def _warn_changed_options(saved: dict, config: TrainConfig) -> None:
    current = dataclasses.asdict(config)
    changed = [f"{key}: {saved[key]!r} -> {value!r}" for key, value in current.items()
               if key not in _RESUME_FREE_OPTIONS and key in saved and saved[key] != value]
    if changed:
        logger.warning("resuming with changed options (%s): not a continuation of the same recipe", "; ".join(changed))


def run_training(config: TrainConfig) -> TrainResult:
    """Trains per ``config`` (launched once per process; torchrun sets the process group).

    Raises:
        ConfigError: invalid options (e.g. a global batch not divisible by the process count).
        ValueError: unreadable data (unpaired files, missing folders) or weights.
    """
    config.validate()
    env = init_distributed(config.device)
    try:
        return _run(config, env)
    finally:
        cleanup_distributed()


def _run(config: TrainConfig, env: DistEnv) -> TrainResult:
    accumulation = config.accumulation_steps(env.world_size)
    output_dir = Path(config.output_dir)
    set_deterministic(config.deterministic)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir)
    logger.info("%s on %d process(es) (%s): global batch %d = %d per process x %d x %d accumulation steps",
                config.stage, env.world_size, env.device, config.global_batch, config.batch_size, env.world_size,
                accumulation)

    train_set = shared_dataset(config.train, config.box_jitter, env)
    train_summary = describe_dataset(train_set, config.train)
    logger.info("training data: %d images (%d empty masks skipped) from %d task(s) under %s", len(train_set),
                train_set.skipped_empty, len(train_summary["tasks"]), config.train.root)
    val_set = val_summary = None
    if config.val is not None:
        val_set = shared_dataset(config.val, 0, env)
        val_summary = describe_dataset(val_set, config.val)
        logger.info("validation data: %d images (%d empty masks skipped) under %s", len(val_set),
                    val_set.skipped_empty, config.val.root)
        if config.val.layout == "ood" and config.val.split == "inference":
            logger.warning("validating on the OOD inference (test) split: best.pth is selected on test data")

    seed_everything(config.seed)  # same random init (tiny backbones, fresh adapters) on every rank
    model = build_training_model(config, env.device)
    for dataset in (train_set, val_set):  # items normalised as this backbone's predictor does (lite: min-max, 0..1)
        if dataset is not None:
            dataset.normalize = model.pixel_normalize()
    total, trainable = count_parameters(model)
    logger.info("model %s: %.2f M parameters, %.2f M trainable", config.backbone, total / 1e6, trainable / 1e6)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)

    loader = train_loader(train_set, config.batch_size, env, config.seed, config.num_workers)
    steps_per_epoch = math.ceil(len(micro_batch_sizes(loader)) / accumulation)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    schedule = LRSchedule(base_lr=config.lr, total_steps=total_steps, min_lr=config.min_lr, kind=config.lr_schedule,
                          warmup_steps=min(total_steps, round(config.warmup_epochs * steps_per_epoch)))
    val_loader = (eval_loader(val_set, config.batch_size, env, config.num_workers) if val_set is not None else None)

    state = ResumeState()
    resume_path = resolve_resume_path(config.resume, output_dir)
    if resume_path is not None:
        state = load_resume(resume_path, model, optimizer, env, config.seed)
        set_train_mode(model)
        _warn_changed_options(model.metadata.get("config") or {}, config)
        logger.info("resumed from %s: %d epoch(s), %d step(s) done", resume_path, state.epochs_done,
                    state.global_step)
    else:
        seed_everything(config.seed + env.rank)  # data order comes from the sampler; jitter/dropout per rank

    network = model
    if env.distributed:
        # Unused parameters every step: the decoder's 4th mask token (3 of 4 are output) and,
        # without --iou-loss-weight, the IoU head.
        network = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                          find_unused_parameters=True)

    recorder = RunRecorder(output_dir, env.is_main, tensorboard=config.tensorboard,
                           resume_step=state.global_step, history=state.history)
    result = TrainResult(output_dir=output_dir, epochs_done=state.epochs_done, global_step=state.global_step,
                         history=recorder.history)
    best = state.best
    try:
        for epoch in range(state.epochs_done, config.epochs):
            started = time.perf_counter()
            loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(
                network, loader, optimizer, schedule, env,
                global_step=result.global_step, accumulation=accumulation, iou_loss_weight=config.iou_loss_weight,
                amp=config.amp, max_steps=config.max_steps_per_epoch, progress=config.progress,
                on_step=lambda step, loss, lr, epoch=epoch: recorder.step(step, epoch + 1, loss, lr),
                description=f"epoch {epoch + 1}/{config.epochs}",
            )
            result.global_step = stats.global_step
            result.step_losses.extend(stats.step_losses)
            row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_dice": stats.dice, "val_dice_oracle": None,
                   "val_dice_by_iou": None, "lr": stats.step_losses[-1][2] if stats.step_losses else None}
            if val_loader is not None:
                rows = evaluate(network, val_loader, env, amp=config.amp, surface=False, progress=config.progress,
                                description=f"validate {epoch + 1}")
                row["val_dice_oracle"] = mean_dice(rows, env, "dice_oracle")
                row["val_dice_by_iou"] = mean_dice(rows, env, "dice_by_iou")
            row["seconds"] = round(time.perf_counter() - started, 3)
            recorder.epoch(row, result.global_step)
            result.epochs_done = epoch + 1
            logger.info("epoch %d/%d: loss %.4f, train Dice %.4f%s (%.0f s)", epoch + 1, config.epochs, stats.loss,
                        stats.dice, "" if row["val_dice_oracle"] is None else
                        f", val Dice oracle {row['val_dice_oracle']:.4f} / by IoU {row['val_dice_by_iou']:.4f}",
                        row["seconds"])

            improved = False
            if row["val_dice_oracle"] is not None:
                value = row[f"val_{config.val_metric}"]
                improved = best is None or value > best["value"]
                if improved:
                    best = {"metric": config.val_metric, "value": value, "epoch": epoch + 1}
            rng_states = gather_objects(capture_rng_state(env.device), env)  # every rank takes part
            if env.is_main:
                metadata = _run_metadata(config, env, accumulation, train_summary, val_summary, epoch + 1,
                                         result.global_step, recorder.history)
                metadata["best"] = best
                if improved:
                    save_training_checkpoint(model, optimizer, output_dir / BEST_CHECKPOINT, epoch + 1, metadata)
                    result.best_checkpoint = output_dir / BEST_CHECKPOINT
                resume = {"global_step": result.global_step, "sampler_epoch": epoch + 1,
                          "world_size": env.world_size, "rng": rng_states, "history": recorder.history,
                          "best": best}
                save_training_checkpoint(model, optimizer, output_dir / LAST_CHECKPOINT, epoch + 1, metadata, resume)
            barrier(env)
            if config.stop_after_epoch is not None and epoch + 1 >= config.stop_after_epoch \
                    and epoch + 1 < config.epochs:
                logger.info("stopping after epoch %d as asked; continue with --resume %s", epoch + 1,
                            output_dir / LAST_CHECKPOINT)
                return result

        if result.epochs_done == config.epochs and env.is_main:
            final = output_dir / final_checkpoint_name(config.backbone)
            metadata = _run_metadata(config, env, accumulation, train_summary, val_summary, result.epochs_done,
                                     result.global_step, recorder.history)
            metadata["best"] = best
            save_training_checkpoint(model, optimizer, final, result.epochs_done, metadata)
            result.final_checkpoint = final
            logger.info("wrote %s (load it with build_model(%r, checkpoint=...))", final, config.backbone)
        barrier(env)
        if (output_dir / BEST_CHECKPOINT).is_file():
            result.best_checkpoint = output_dir / BEST_CHECKPOINT
        return result
    finally:
        recorder.close()


def run_cli(prog: str, parser, argv: list[str] | None, make_config, run) -> int:
    """Console-script body shared by pretrain/finetune/evaluate: parse, validate, configure
    logging, run; config and data errors exit with status 2 and one line on stderr.

    Args:
        prog: the command's name for the error line (``medsegx-pretrain`` ...).
        parser: its argparse parser.
        make_config: parsed arguments -> config dataclass (with ``validate()``).
        run: config -> result.
    """
    config = make_config(parser.parse_args(argv))
    try:
        config.validate()
    except ConfigError as err:
        parser.error(str(err))
    configure_logging(DistEnv(rank=int(os.environ.get("RANK", "0"))))
    try:
        run(config)
    except ValueError as err:  # ConfigError, CheckpointError and the data readers' errors
        logger.error("%s", err)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main_for_stage(stage: str, argv: list[str] | None = None) -> int:
    """The pretrain / finetune console scripts."""
    return run_cli(f"medsegx-{stage}", build_train_parser(stage), argv,
                   lambda args: train_config_from_args(stage, args), run_training)
