"""Training throughput of ConMoAE-SAM: images/s per process for one optimizer step.

Each step is the trainer's own ``medsegx_training.engine.train_one_epoch`` (``medsegx.steps.training_loss``:
forward, Dice + BCE min-over-masks loss, backward, AdamW step on the trainable parameters
only) on an in-memory batch of synthetic 256 x 256 images, so data loading from disk is
not included. A few warm-up steps are run first and not timed.

- CPU (always): ``lite`` (the embedded LiteMedSAM weights) and ``vit_b`` (random weights,
  ``pretrained=False``: the official SAM file is not available offline; speed does not
  depend on the values) at batch 8 with ``torch.set_num_threads(2)``.
- GPU (if ``torch.cuda.is_available()``): ``vit_b`` at batch 128 with bf16 autocast, and the
  projected wall time of the paper's 30-epoch pretraining on 8 GPUs at the measured rate.

Expect ``lite`` to be slower than ``vit_b`` per image here: LiteMedSAM's TinyViT keeps
full resolution (256 x 256) in its convolutional stage and 128 x 128 tokens in its first
attention stage (its embedding is 64 x 64, vs. ViT-B's 16 x 16 at 256 px), and ConMoAE's
trainable adapters start in that first attention stage, so the backward pass runs through
nearly the whole encoder.

Run: ``python bench/train_throughput.py`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medsegx.build import build_model
from medsegx.items import PixelNormalize, item_from_arrays
from medsegx.steps import build_optimizer, set_train_mode
from medsegx.taxonomy import resolve

from medsegx_training.distributed import DistEnv
from medsegx_training.engine import LRSchedule, train_one_epoch

# MedSegDB ID test set size (spec); the train split size is not in the spec.
ID_TEST_IMAGES = 327_732
# Assumption: an 80/20 train/test split, i.e. train ~ 4 x test ~ 1.31 M images.
ASSUMED_TRAIN_IMAGES = 4 * ID_TEST_IMAGES
PAPER_EPOCHS = 30
PAPER_GPUS = 8


class SyntheticBatch(Dataset):
    """``length`` items cycling over ``distinct`` random ellipse images, in the one item format (``medsegx.items``)."""

    def __init__(self, length: int, distinct: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        rows, cols = np.mgrid[0:256, 0:256]
        self.items = []
        context = resolve("Liver", "CT").indices
        for _ in range(distinct):
            centre, radius = rng.uniform(80, 176, 2), rng.uniform(20, 50, 2)
            mask = ((rows - centre[0]) / radius[0]) ** 2 + ((cols - centre[1]) / radius[1]) ** 2 <= 1
            image = np.where(mask, 180.0, 60.0) + rng.normal(0, 12, (256, 256))
            pixels = np.clip(image, 0, 255).astype(np.uint8)
            self.items.append({**item_from_arrays(pixels, mask, context, PixelNormalize()), "path": "synthetic"})
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.items[index % len(self.items)]


def measure(backbone: str, pretrained: bool, device: torch.device, batch: int, warmup: int, steps: int,
            amp: bool) -> dict:
    """Images/s of ``steps`` timed optimizer steps (after ``warmup`` untimed ones) of one process."""
    torch.manual_seed(0)
    model = build_model(backbone, device=device, pretrained=pretrained)
    set_train_mode(model)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.01)
    env = DistEnv(device=device)
    schedule = LRSchedule(base_lr=1e-4, total_steps=warmup + steps, kind="constant")

    def run(n_steps: int) -> float:
        loader = DataLoader(SyntheticBatch(batch * n_steps), batch_size=batch, shuffle=False, num_workers=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        train_one_epoch(model, loader, optimizer, schedule, env, global_step=0, accumulation=1, amp=amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    run(warmup)
    seconds = run(steps)
    return {"backbone": backbone, "weights": "embedded LiteMedSAM" if pretrained else "random (pretrained=False)",
            "device": str(device), "batch": batch, "precision": "bf16 autocast" if amp and device.type == "cuda"
            else "fp32", "steps": steps, "seconds_per_step": seconds / steps, "images_per_s": batch * steps / seconds,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def projected_pretraining_hours(images_per_s_per_gpu: float, train_images: int, gpus: int = PAPER_GPUS,
                                epochs: int = PAPER_EPOCHS) -> float:
    """Wall time of ``epochs`` passes over ``train_images`` on ``gpus`` GPUs, assuming linear scaling."""
    return epochs * train_images / (images_per_s_per_gpu * gpus) / 3600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu-batch", type=int, default=8)
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument("--steps", type=int, default=3, help="timed steps on CPU (GPU: 4x)")
    parser.add_argument("--train-images", type=int, default=ASSUMED_TRAIN_IMAGES,
                        help="MedSegDB train-set size for the projection (default: assumed 4 x ID test)")
    parser.add_argument("--backbones", nargs="+", default=["lite", "vit_b"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = [measure(backbone, backbone == "lite", torch.device("cpu"), args.cpu_batch, args.warmup, args.steps,
                       amp=False) for backbone in args.backbones]
    if torch.cuda.is_available():
        results.append(measure("vit_b", False, torch.device("cuda", 0), args.gpu_batch, args.warmup + 1,
                               4 * args.steps, amp=True))

    print(f"Training throughput (forward + backward + AdamW step on the trainable parameters), one process, "
          f"torch {torch.__version__}, CPU threads = {args.threads}\n")
    print("| backbone | weights | device | batch | precision | s / step | images/s per process | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        print(f"| {row['backbone']} | {row['weights']} | {row['device']} | {row['batch']} | {row['precision']} | "
              f"{row['seconds_per_step']:.2f} | {row['images_per_s']:.2f} | {peak} |")
    gpu = [row for row in results if row["device"].startswith("cuda")]
    if gpu:
        rate = gpu[0]["images_per_s"]
        hours = projected_pretraining_hours(rate, args.train_images)
        print(f"\nProjected paper pretraining ({PAPER_EPOCHS} epochs x {args.train_images:,} images, "
              f"{PAPER_GPUS} x {torch.cuda.get_device_name(0)}, {rate:.0f} images/s per GPU, linear scaling, "
              f"no data-loading or validation cost): {hours:.1f} h")
        if args.train_images == ASSUMED_TRAIN_IMAGES:
            print(f"(train-set size assumed: 4 x the ID test n = {ID_TEST_IMAGES:,}; pass --train-images to change)")
    else:
        print("\nNo CUDA device: the vit_b batch-128 bf16 GPU measurement and the 8-GPU projection were skipped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
