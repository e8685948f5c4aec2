"""Datasets and loaders for training and evaluation, on top of ``medsegx.data``.

``medsegx.data`` reads both MedSegDB layouts, resolves every ``<Modality>_<Target>``
folder to its ConMoAE context through the taxonomy, raises a clear error for files that
do not pair up, and skips (and counts) empty masks. Here we only choose the reader, shard
the data over processes and summarise what was read.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from medsegx.data import MedSegDBDataset, scan_id_layout, scan_ood_layout

from medsegx_training.config import DataConfig
from medsegx_training.distributed import DistEnv, broadcast_object

logger = logging.getLogger(__name__)


def build_dataset(data: DataConfig, jitter: int = 0) -> MedSegDBDataset:
    """The cases of ``data`` as a ``MedSegDBDataset`` (empty masks dropped and counted).

    Raises:
        ValueError: from the readers (missing folders, unpaired files, nothing found).
    """
    if data.layout == "id":
        records = scan_id_layout(data.root, datasets=data.datasets)
    else:
        records = scan_ood_layout(data.root, split=data.split, percent=int(data.percent), shift=data.shift,
                                  task=data.task, dataset=data.dataset)
    dataset = MedSegDBDataset(records, jitter=jitter)
    if len(dataset) == 0:
        raise ValueError(f"every one of the {dataset.skipped_empty} masks under {data.root} is empty: nothing to use")
    return dataset


def shared_dataset(data: DataConfig, jitter: int, env: DistEnv) -> MedSegDBDataset:
    """``build_dataset`` on rank 0 only; the other ranks reuse its record list.

    Rank 0 scans the tree and reads every mask once for the empty check, so a large
    release is not scanned once per process.
    """
    dataset = build_dataset(data, jitter=jitter) if env.is_main else None
    shared = broadcast_object((dataset.records, dataset.skipped_empty) if dataset is not None else None, env)
    if dataset is None:
        records, skipped_empty = shared
        dataset = MedSegDBDataset(records, jitter=jitter, skip_empty=False)
        dataset.skipped_empty = skipped_empty
    return dataset


def split_name(record) -> str:
    """``"id"`` for ID records, the shift (``cross_site`` / ``cross_task``) for OOD ones."""
    return record.shift or "id"


def describe_dataset(dataset: MedSegDBDataset, data: DataConfig) -> dict:
    """A plain-type summary for logs and checkpoint metadata."""
    tasks = Counter(record.task_folder for record in dataset.records)
    return {
        "root": str(data.root),
        "layout": data.layout,
        "split": data.split if data.layout == "ood" else "train/test",
        "percent": int(data.percent) if data.layout == "ood" and data.split == "finetune" else None,
        "images": len(dataset),
        "skipped_empty": int(dataset.skipped_empty),
        "datasets": sorted({record.dataset for record in dataset.records}),
        "tasks": dict(sorted(tasks.items())),
    }


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` gets indices ``r, r + W, r + 2W, ...`` in order, with no padding.

    For evaluation: unlike ``DistributedSampler`` it never repeats an image, so sums
    gathered over ranks count each image once.
    """

    def __init__(self, length: int, env: DistEnv) -> None:
        self.indices = list(range(env.rank, length, env.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: MedSegDBDataset, batch_size: int, env: DistEnv, seed: int, num_workers: int) -> DataLoader:
    """Shuffled, sharded training loader.

    ``DistributedSampler`` shuffles with ``seed + epoch`` (call ``loader.sampler.set_epoch``)
    and gives rank ``r`` the permutation's items ``r, r + W, ...``; with one process it is the
    plain permutation, so W processes x B images see the same global batches as one process
    x W*B images. Workers are not persistent: their seeds come from the main process's torch
    RNG at every epoch, which the checkpoint restores for an exact resume.
    """
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=env.device.type == "cuda", drop_last=False, persistent_workers=False)


def eval_loader(dataset: MedSegDBDataset, batch_size: int, env: DistEnv, num_workers: int,
                limit: int | None = None) -> DataLoader:
    """Sequential loader over this rank's shard (``limit``: only the first images, for smoke tests)."""
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), env),
                      num_workers=num_workers, pin_memory=env.device.type == "cuda")


def micro_batch_sizes(loader: DataLoader) -> list[int]:
    """Sizes of this rank's batches in one epoch (the last may be short)."""
    samples, batch = len(loader.sampler), loader.batch_size
    return [min(batch, samples - index * batch) for index in range(math.ceil(samples / batch))]
