"""Training checkpoints: the official MedSegX layout plus what an exact resume needs.

Every file is written by ``medsegx.checkpoint.save_checkpoint`` (atomic: temporary file
then rename) as ``{"model": trainable weights, "optimizer", "epoch": epochs completed,
"metadata"}``, so each one loads in the app with ``build_model(backbone, checkpoint=path)``.
``last.pth`` additionally carries ``metadata["resume"]``::

    global_step     optimizer steps done (the LR schedule position)
    sampler_epoch   the next DistributedSampler epoch (= epochs completed)
    world_size      processes that wrote it
    rng             per rank: python / numpy / torch (/ cuda) RNG states
    history         per-epoch records (for history.csv and the plot)
    best            {"metric", "value", "epoch"} of best.pth, or None

All of it is plain types and tensors, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medsegx.checkpoint import CheckpointError, load_checkpoint, read_file, save_checkpoint
from medsegx.modeling import MedSegXModel

from medsegx_training.distributed import DistEnv, restore_rng_state, seed_everything

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"


def final_checkpoint_name(backbone: str) -> str:
    """The run's output file, named like the official ``medsegx_vit_b.pth``."""
    return f"medsegx_{backbone}.pth"


@dataclass
class ResumeState:
    """Where a resumed run continues (see the module docstring)."""

    epochs_done: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None


def resolve_resume_path(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> ``OUTPUT_DIR/last.pth`` if it exists; else the path.

    Raises:
        CheckpointError: an explicit path that does not exist.
    """
    if not resume:
        return None
    if resume == "auto":
        candidate = Path(output_dir) / LAST_CHECKPOINT
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path} does not exist")
    return path


def save_training_checkpoint(model: MedSegXModel, optimizer: torch.optim.Optimizer, path: str | os.PathLike,
                             epochs_done: int, metadata: dict, resume: dict | None = None) -> None:
    """Writes an official-layout checkpoint; ``resume`` (rank 0 only) makes it resumable."""
    meta = dict(metadata)
    if resume is not None:
        meta["resume"] = resume
    save_checkpoint(model, path, metadata=meta, optimizer=optimizer, epoch=epochs_done)


def load_resume(path: Path, model: MedSegXModel, optimizer: torch.optim.Optimizer, env: DistEnv,
                seed: int) -> ResumeState:
    """Restores weights, optimizer and this rank's RNG states from ``last.pth``.

    If the world size changed, the RNG states cannot be mapped to ranks: every rank is
    reseeded from ``seed``, rank and epoch instead (the run continues, but not bit-exactly).

    Raises:
        CheckpointError: not a resumable checkpoint, or one of another backbone / shape.
    """
    data = read_file(path, "training checkpoint")
    resume = (data.get("metadata") or {}).get("resume")
    if not resume:
        raise CheckpointError(f"{path} has no resume state (not a last.pth of medsegx-pretrain/finetune); "
                              "to start from its weights pass it as --checkpoint instead")
    load_checkpoint(model, path)
    if data.get("optimizer") is None:
        raise CheckpointError(f"{path} has no optimizer state")
    optimizer.load_state_dict(data["optimizer"])
    epochs_done = int(data["epoch"])
    rng_states = resume.get("rng") or []
    if int(resume.get("world_size", 0)) == env.world_size and len(rng_states) == env.world_size:
        restore_rng_state(rng_states[env.rank], env.device)
    else:
        logger.warning("%s was written by %s process(es), this run has %d: RNG streams are reseeded, so the "
                       "resumed run is not bit-identical to an uninterrupted one", path, resume.get("world_size"),
                       env.world_size)
        seed_everything(seed + env.rank + 1000 * epochs_done)
    return ResumeState(epochs_done=epochs_done, global_step=int(resume["global_step"]),
                       history=list(resume.get("history") or []), best=resume.get("best"))
