"""Few-shot fine-tuning curve on CPU: Dice on unseen slices after labelling k slices.

For each case (a structure of a sample volume the model was not trained on), label
``k = 0, 1, 2, 4, 8`` slices, fine-tune a fresh copy of the model on them with the in-loop
train task's own step (``medsegx.steps.train_step``: box pushed out by 0..19 px, Dice + BCE
min over the three masks, adapters / gates / context embeddings / mask decoder trained),
and report the Dice of the remaining slices. ``k = 0`` is the zero-shot model, measured in
the same run on the same slices.

- Slices are axial slices of the ``(Z, H, W)`` stack, prepared as the infer task prepares
  them (``medsegx.transforms.prepare_volume`` on the whole volume, then
  ``to_model_input``); a slice counts when the structure covers >= 10 pixels.
- The k training slices are spread evenly over the structure's extent (the middle of k equal
  parts: k = 1 is the middle slice, k = 2 never the two tips); the evaluation
  slices are the structure's other slices (never a training slice for any k), at most
  ``--eval-slices`` of them, evenly spread: the same evaluation set for every k.
- Every k > 0 trains ``--steps`` optimiser steps (batch 1, cycling through its k slices in
  a new random order each pass): the same compute for every k, so the curve shows the
  effect of the labels, not of longer training. One "epoch" = one pass over the k slices.
- Dice (256 x 256 grid, sigmoid > 0.5, exact box): of the mask chosen by predicted IoU (what
  the infer task returns) and of the best of the three (the paper's oracle protocol).
- CPU seconds are ``time.process_time()`` of this process (all its threads), wall seconds
  beside them; ``--threads`` torch threads (default 2).

Cases (built with ``sample-data/build_sample_data.py`` into a temporary folder unless
``--datastore`` points at a built one):

- ``mni_wm``: MNI152 T1 white matter (label 2, MRI; the task exists in MedSegDB, but the
  LiteMedSAM-based model has never been trained with its context);
- ``phantom_organ_b``: the CT phantom's spleen (label 2) under the name ``organ_b``, which is
  outside MedSegDB (unknown context: modality only, free task row).

Usage::

    python bench/finetune_curve.py [--cases mni_wm phantom_organ_b] [--ks 0 1 2 4 8]
        [--steps 24] [--lr 1e-4] [--eval-slices 16] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medsegx.build import build_model
from medsegx.items import item_from_arrays, jitter_box
from medsegx.slices import evenly_spaced, structure_slices
from medsegx.steps import build_optimizer, train_step, val_step
from medsegx.taxonomy import resolve
from medsegx.transforms import prepare_volume

logger = logging.getLogger("finetune_curve")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KS = (0, 1, 2, 4, 8)


@dataclass(frozen=True)
class Case:
    name: str
    image: str
    label_value: int
    target: str
    modality: str
    note: str


CASES = {
    "mni_wm": Case("mni_wm", "mni152_t1.nii.gz", 2, "white_matter", "MRI", "MNI152 T1 white matter"),
    "phantom_organ_b": Case("phantom_organ_b", "ct_phantom.nii.gz", 2, "organ_b", "CT",
                            "CT phantom spleen named 'organ_b' (outside MedSegDB)"),
}


def build_sample_data(out_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("build_sample_data", REPO / "sample-data" / "build_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return Path(module.build(out_dir / "datastore")["datastore"])


def load_case(datastore: Path, case: Case):
    """Prepared ``(Z, H, W)`` uint8 slices, the structure's ``(Z, H, W)`` mask and its slices."""
    image_xyz = np.asarray(nib.load(str(datastore / case.image)).dataobj, dtype=np.float32)
    label_xyz = np.asarray(nib.load(str(datastore / "labels" / "final" / case.image)).dataobj)
    context = resolve(case.target, case.modality)
    prepared = prepare_volume(np.transpose(image_xyz, (2, 1, 0)), case.modality, context, channels=1)
    labels = np.transpose(label_xyz, (2, 1, 0))
    slices = structure_slices(labels)[case.label_value].tolist()
    return prepared, labels == case.label_value, slices, context


def items_for(model, prepared, mask, slices, context):
    return [item_from_arrays(prepared[z], mask[z], context.indices, model.normalize) for z in slices]


def evaluate(model, items, batch_size: int = 4) -> tuple[list[float], list[float]]:
    chosen, oracle = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = {key: torch.stack([item[key] for item in chunk]) for key in chunk[0]}
        output = val_step(model, batch)
        chosen.extend(output["dice"].tolist())
        oracle.extend(output["dice_oracle"].tolist())
    return chosen, oracle


def finetune(model, items, steps: int, lr: float, seed: int) -> dict:
    optimizer = build_optimizer(model, lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(items), generator=generator).tolist()
        item = items[order.pop()]
        batch = {key: value[None] for key, value in item.items()}
        batch["box"] = jitter_box(item["box"], item["valid_hw"], generator=generator)[None]
        losses.append(train_step(model, batch, optimizer)["loss"].item())
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    return {"cpu_s": cpu, "wall_s": wall, "first_loss": losses[0], "last_loss": statistics.mean(losses[-len(items):])}


def run_case(case: Case, datastore: Path, base_model, ks, steps, lr, eval_slices, seed) -> list[dict]:
    prepared, mask, slices, context = load_case(datastore, case)
    # the evaluation set leaves out the training slices of every default k too, so runs with
    # other --ks (e.g. a learning-rate check at one k) evaluate on the same slices
    training_sets = {k: evenly_spaced(slices, k, ends=False) for k in sorted(set(ks) | set(DEFAULT_KS)) if k > 0}
    used = set().union(*training_sets.values()) if training_sets else set()
    eval_set = evenly_spaced([z for z in slices if z not in used], eval_slices)
    logger.info("%s: %d slices with the structure; evaluation on %d: %s", case.name, len(slices), len(eval_set),
                eval_set)
    eval_items = items_for(base_model, prepared, mask, eval_set, context)
    rows = []
    for k in ks:
        model = copy.deepcopy(base_model)
        row = {"case": case.name, "k": k, "train_slices": training_sets.get(k, []), "eval_slices": len(eval_set)}
        if k > 0:
            train_items = items_for(model, prepared, mask, training_sets[k], context)
            timing = finetune(model, train_items, steps, lr, seed)
            row.update(steps=steps, epochs=steps / k, cpu_s_per_image=timing["cpu_s"] / steps,
                       wall_s_per_image=timing["wall_s"] / steps, cpu_s_per_epoch=timing["cpu_s"] / steps * k,
                       first_loss=timing["first_loss"], last_loss=timing["last_loss"])
        cpu_start = time.process_time()
        chosen, oracle = evaluate(model, eval_items)
        row.update(dice=statistics.mean(chosen), dice_sd=statistics.pstdev(chosen), dice_oracle=statistics.mean(oracle),
                   eval_cpu_s_per_image=(time.process_time() - cpu_start) / len(eval_items))
        logger.info("%s k=%d: Dice %.4f (oracle %.4f)%s", case.name, k, row["dice"], row["dice_oracle"],
                    f", {row['cpu_s_per_image']:.2f} CPU s/image" if k else "")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | k | steps (epochs) | Dice, IoU-chosen (sd) | Dice, oracle | CPU s / epoch | CPU s / image | "
             "wall s / image |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["k"] == 0:
            training = ("0 (zero-shot)", "-", "-", "-")
        else:
            training = (f"{row['steps']} ({row['epochs']:.1f})", f"{row['cpu_s_per_epoch']:.1f}",
                        f"{row['cpu_s_per_image']:.2f}", f"{row['wall_s_per_image']:.2f}")
        lines.append(f"| {row['case']} | {row['k']} | {training[0]} | {row['dice']:.3f} ({row['dice_sd']:.3f}) | "
                     f"{row['dice_oracle']:.3f} | {training[1]} | {training[2]} | {training[3]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS))
    parser.add_argument("--steps", type=int, default=24, help="optimiser steps for every k > 0")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-slices", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datastore", type=Path, default=None, help="a built sample datastore (default: build one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        datastore = args.datastore or build_sample_data(Path(tmp))
        start = time.perf_counter()
        base_model = build_model("lite")
        logger.info("lite model built in %.1f s; %d torch threads", time.perf_counter() - start,
                    torch.get_num_threads())
        rows = []
        for name in args.cases:
            rows.extend(run_case(CASES[name], datastore, base_model, sorted(args.ks), args.steps, args.lr,
                                 args.eval_slices, args.seed))
    print(markdown(rows))
    print(f"\nlr {args.lr}, {args.steps} steps per k (batch 1), torch threads {args.threads}; "
          + "; ".join(f"{c}: {CASES[c].note}" for c in args.cases))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
