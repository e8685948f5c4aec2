"""Rank-0 run records: TensorBoard scalars, per-step / per-epoch CSVs and the loss/Dice plot.

Files in the output folder::

    train_steps.csv      step, epoch, loss, lr (one row per optimizer step)
    history.csv          epoch, train_loss, train_dice, val_dice_oracle, val_dice_by_iou, lr, seconds
    training_curves.png  loss and Dice per epoch (matplotlib, Agg backend)
    tensorboard/         train/loss, train/lr per step; epoch/* at each epoch's last step
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

STEPS_FILE = "train_steps.csv"
HISTORY_FILE = "history.csv"
PLOT_FILE = "training_curves.png"
HISTORY_COLUMNS = ("epoch", "train_loss", "train_dice", "val_dice_oracle", "val_dice_by_iou", "lr", "seconds")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_steps(output_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``train_steps.csv`` as dicts of numbers (empty if the file is absent)."""
    path = Path(output_dir) / STEPS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{"step": int(row["step"]), "epoch": int(row["epoch"]), "loss": float(row["loss"]),
                 "lr": float(row["lr"])} for row in csv.DictReader(handle)]


class RunRecorder:
    """Writes the run's records; every method is a no-op on ranks other than 0.

    Args:
        output_dir: the run folder.
        enabled: True on rank 0.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
        resume_step: on resume, the optimizer steps already done: later rows of
            ``train_steps.csv`` (from an interrupted epoch) are dropped.
        history: epoch rows restored from the checkpoint.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True,
                 resume_step: int = 0, history: list[dict] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.history: list[dict] = list(history or [])
        self.writer = None
        self._steps_handle = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        steps = [row for row in read_steps(self.output_dir) if row["step"] < resume_step]
        _write_csv(self.output_dir / STEPS_FILE, ("step", "epoch", "loss", "lr"), steps)
        self._steps_handle = (self.output_dir / STEPS_FILE).open("a", newline="")
        self._steps_writer = csv.writer(self._steps_handle)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'medsegx[train]' "
                                  "(or pass --no-tensorboard)") from err
            self.writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=resume_step or None)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        self._steps_writer.writerow([step, epoch, f"{loss:.8g}", f"{lr:.8g}"])
        self._steps_handle.flush()
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, row: dict, global_step: int) -> None:
        """Records one epoch (keys of ``HISTORY_COLUMNS``), rewrites history.csv and the plot.

        TensorBoard gets the epoch scalars at ``global_step`` (optimizer steps so far), the
        x axis of the per-step scalars.
        """
        if not self.enabled:
            return
        self.history.append(dict(row))
        _write_csv(self.output_dir / HISTORY_FILE, HISTORY_COLUMNS, self.history)
        if self.writer is not None:
            for key in ("train_loss", "train_dice", "val_dice_oracle", "val_dice_by_iou"):
                value = row.get(key)
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, global_step)
            self.writer.flush()
        plot_history(self.history, self.output_dir / PLOT_FILE)

    def close(self) -> None:
        if self._steps_handle is not None:
            self._steps_handle.close()
            self._steps_handle = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_history(history: list[dict], path: str | os.PathLike) -> None:
    """Loss (left) and Dice (right) per epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axis.set(xlabel="epoch", ylabel="Dice + BCE (min over 3 masks)", title="loss")
    dice_axis.plot(epochs, [row["train_dice"] for row in history], marker="o", label="train (oracle)")
    for key, label in (("val_dice_oracle", "val (oracle)"), ("val_dice_by_iou", "val (by IoU)")):
        values = [row.get(key) for row in history]
        if any(value is not None for value in values):
            dice_axis.plot(epochs, [math.nan if value is None else value for value in values], marker="o", label=label)
    dice_axis.set(xlabel="epoch", ylabel="DSC", title="Dice", ylim=(0.0, 1.0))
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
