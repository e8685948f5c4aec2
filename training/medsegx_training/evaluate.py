"""``medsegx-evaluate``: per-image DSC / HD95 / NSD of a checkpoint on MedSegDB test sets.

Protocol (``spec/conmoae.md``, "Evaluation"): exact ground-truth box, 256 x 256 grid,
foreground where ``sigmoid > 0.5``, NSD at 2 px. Each image is scored twice:

- ``oracle``: the best of the 3 masks by DSC, the paper's protocol (it needs the ground truth);
- ``by_iou``: the mask with the highest predicted IoU, what a user actually gets.

Outputs in ``--output-dir``: ``per_image.csv`` (one row per image), ``summary.md`` (per
split and per task means), ``summary.json`` and ``config.yaml``::

    medsegx-evaluate --checkpoint runs/pretrain/medsegx_vit_b.pth --sam-checkpoint sam_vit_b_01ec64.pth \\
        --id-root /data/MedSegDB/test --ood-root /data/MedSegDB/ood --output-dir runs/eval

Several processes (``torchrun``) split the images; rank 0 writes the files.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsegx.build import build_model

from medsegx_training.config import EvalConfig, build_eval_parser, eval_config_from_args, save_config
from medsegx_training.loaders import describe_dataset, eval_loader, shared_dataset, split_name
from medsegx_training.distributed import DistEnv, barrier, cleanup_distributed, gather_objects, init_distributed
from medsegx_training.engine import evaluate
from medsegx_training.trainer import run_cli

logger = logging.getLogger(__name__)

CSV_FILE = "per_image.csv"
SUMMARY_FILE = "summary.md"
SUMMARY_JSON = "summary.json"
CHOICES = ("oracle", "by_iou")
METRICS = ("dice", "hd95", "nsd")
RECORD_COLUMNS = ("split", "dataset", "task", "modality", "target", "sequence", "path")
METRIC_COLUMNS = tuple(f"{metric}_{choice}" for metric in METRICS for choice in CHOICES)
CSV_COLUMNS = RECORD_COLUMNS + METRIC_COLUMNS + ("mask_oracle", "mask_by_iou", "iou_pred_by_iou")


@dataclass
class EvalResult:
    csv_path: Path
    summary_path: Path
    summary: dict


def _record_columns(record) -> dict:
    return {"split": split_name(record), "dataset": record.dataset, "task": record.task_folder,
            "modality": record.modality, "target": record.target, "sequence": record.sequence or "",
            "path": str(record.image_path)}


def summarise(rows: list[dict]) -> dict:
    """Means of every metric per split, per (split, task) and overall.

    Returns:
        ``{"overall": stats, "splits": {split: stats}, "tasks": {"split/task": stats}}`` where
        ``stats`` holds ``images``, ``tasks`` and one mean per ``METRIC_COLUMNS`` entry.
    """
    def stats(group: list[dict]) -> dict:
        result = {"images": len(group), "tasks": len({(row["split"], row["task"]) for row in group})}
        for column in METRIC_COLUMNS:
            result[column] = float(np.mean([row[column] for row in group])) if group else float("nan")
        return result

    by_split, by_task = defaultdict(list), defaultdict(list)
    for row in rows:
        by_split[row["split"]].append(row)
        by_task[f"{row['split']}/{row['task']}"].append(row)
    return {"overall": stats(rows), "splits": {key: stats(value) for key, value in sorted(by_split.items())},
            "tasks": {key: stats(value) for key, value in sorted(by_task.items())}}


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(line) + " |"
                                                                           for line in lines]


def _metric_cells(stats: dict) -> list[str]:
    cells = []
    for metric in METRICS:
        for choice in CHOICES:
            value = stats[f"{metric}_{choice}"]
            cells.append(f"{value:.2f}" if metric == "hd95" else f"{value:.4f}")
    return cells


def summary_markdown(summary: dict, config: EvalConfig, test_sets: list[dict]) -> str:
    """The human-readable report: per split and per task, oracle and by-IoU side by side."""
    header_metrics = [f"{name} {choice}" for name in ("DSC", "HD95 (px)", f"NSD@{config.nsd_tolerance:g}px")
                      for choice in ("oracle", "by IoU")]
    lines = [
        "# MedSegX evaluation",
        "",
        f"- checkpoint: `{config.checkpoint or 'none (backbone weights only)'}`, backbone `{config.backbone}`",
        f"- images: {summary['overall']['images']} in {summary['overall']['tasks']} task(s)",
    ]
    for test_set in test_sets:
        lines.append(f"- test set `{test_set['root']}` ({test_set['layout']}, {test_set['split']}): "
                     f"{test_set['images']} images, {test_set['skipped_empty']} empty masks skipped")
    lines += [
        "- **oracle**: the best of the 3 masks by DSC (the paper's protocol; needs the ground truth). "
        "**by IoU**: the mask with the highest predicted IoU (what a user gets).",
        "- exact ground-truth box, 256 x 256 grid, foreground = sigmoid > 0.5; means over images.",
        "",
        "## Per split",
        "",
        *_table(["split", "images", "tasks", *header_metrics],
                [[split, str(stats["images"]), str(stats["tasks"]), *_metric_cells(stats)]
                 for split, stats in [*summary["splits"].items(), ("all", summary["overall"])]]),
        "",
        "## Per task",
        "",
        *_table(["split", "task", "images", *header_metrics],
                [[key.split("/", 1)[0], key.split("/", 1)[1], str(stats["images"]), *_metric_cells(stats)]
                 for key, stats in summary["tasks"].items()]),
        "",
    ]
    return "\n".join(lines)


def run_evaluation(config: EvalConfig) -> EvalResult | None:
    """Evaluates per ``config``; returns the files written (``None`` on ranks other than 0)."""
    config.validate()
    env = init_distributed(config.device)
    try:
        return _run(config, env)
    finally:
        cleanup_distributed()


def _run(config: EvalConfig, env: DistEnv) -> EvalResult | None:
    output_dir = Path(config.output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir)
    model = build_model(config.backbone, sam_checkpoint=config.sam_checkpoint, checkpoint=config.checkpoint,
                        device=env.device, conmoae=config.conmoae, pretrained=not config.backbone.startswith("tiny_"))
    rows: list[dict] = []
    test_sets: list[dict] = []
    for data in config.data:
        dataset = shared_dataset(data, 0, env)
        dataset.normalize = model.pixel_normalize()  # as the predictor of this backbone normalises
        test_sets.append(describe_dataset(dataset, data))
        records = {str(record.image_path): record for record in dataset.records}
        loader = eval_loader(dataset, config.batch_size, env, config.num_workers, limit=config.limit)
        local = evaluate(model, loader, env, amp=config.amp, surface=True, nsd_tolerance=config.nsd_tolerance,
                         progress=config.progress, description=f"evaluate {data.layout} {data.root}")
        for shard in gather_objects(local, env):
            rows.extend({**_record_columns(records[row["path"]]), **row} for row in shard)
    result = None
    if env.is_main:
        rows.sort(key=lambda row: (row["split"], row["task"], row["path"]))
        csv_path = output_dir / CSV_FILE
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        summary = summarise(rows)
        summary_path = output_dir / SUMMARY_FILE
        summary_path.write_text(summary_markdown(summary, config, test_sets))
        (output_dir / SUMMARY_JSON).write_text(json.dumps({"test_sets": test_sets, **summary}, indent=2))
        overall = summary["overall"]
        logger.info("%d images: DSC oracle %.4f / by IoU %.4f; wrote %s and %s", overall["images"],
                    overall["dice_oracle"], overall["dice_by_iou"], csv_path, summary_path)
        result = EvalResult(csv_path=csv_path, summary_path=summary_path, summary=summary)
    barrier(env)
    return result


def main(argv: list[str] | None = None) -> int:
    return run_cli("medsegx-evaluate", build_eval_parser(), argv, eval_config_from_args, run_evaluation)


if __name__ == "__main__":
    sys.exit(main())
