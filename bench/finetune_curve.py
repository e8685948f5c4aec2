"""Few-shot fine-tuning curve on real volumes, against MONAI Label's own recipe, on CPU.

For each case (one structure of a real labelled volume, ``sample-data/real_data.py``), label
``k = 0, 1, 2, 4, 8`` slices and report the Dice on the volume's other slices of:

- **ours**: a copy of the model fine-tuned on the k slices by the in-loop train task's recipe
  and budget: ``medsegx.budget`` decides the steps (``base_steps + steps_per_slice x`` training
  slices), the epochs (``StructureBalancedSampler`` with the plan's epoch length, as the
  task's loader), the validation slices (the training slices below 16 labelled slices, every
  5th of them from 16 on) and the early stop (``EarlyStop``: best-validating weights kept; only
  with held-out slices, i.e. from 16 labelled slices);
  each step is ``medsegx.steps.train_step`` with the task's box jitter (``--box-jitter``,
  ``--box-jitter-fraction``: a tenth of the box's side, at most 20 px). ``k = 0`` is the
  zero-shot model. Dice of the mask the infer task returns for the box (``medsegx.steps.val_step``:
  the predictor's ``box_fit`` choice; until 2026-12-06 this scored the IoU choice).
- **unet**: MONAI Label's recipe for a single structure, the radiology app's
  ``segmentation_spleen`` network (``monai.networks.nets.UNet``, channels 16..256, strides 2,
  2 residual units, batch norm; here 2D, ``spatial_dims=2``) trained from scratch on the same
  k slices with its trainer's loss and optimiser (``DiceCELoss(to_onehot_y, softmax,
  squared_pred, batch)``, AdamW lr 1e-4, weight decay 1e-5), the slice scaled to 0..1, for
  the same CPU seconds as ours took on that k (training and validation). It gets no box.

Both are scored on the same 256 x 256 grid (the model frame: longest side -> 256, padded),
sigmoid > 0.5 for ours, argmax for the UNet, on the same evaluation slices for every k:
``--eval-slices`` of the structure's slices, evenly spread (fewer where the largest k would
not find enough other slices). The k labelled slices are the first k of a random order of the
other slices, one order per seed, so the sets are nested (k = 4 includes k = 2's slices, as an
annotator's labels accumulate). Each seed changes that order, the box jitter and the sampling
order (ours) and the initialisation and order (UNet); rows are mean +- sd over seeds. The
encoder's outputs are computed once per case and shared by every round (``EncoderMemo``: the
rounds keep the served encoder). ``--cross CASE:OTHER``: the models tuned on CASE's k slices, scored
on OTHER, the same structure in another volume of the same modality (Colin27's hand-drawn AAL
hippocampus -> the MNI152 brain with the AAL labels carried over, ``mni_hippocampus``), against
the zero-shot model and the UNet of that k. Another modality (CT pancreas -> MR pancreas) is
routed by its own context, which a CT round does not tune: there ours equals zero-shot.

Real data (cached in ``sample-data/real/``): TotalSegmentator's reference CT / MR (its masks are
**model-made**), Colin27 with the **hand-drawn** AAL atlas, MNI152 with the AAL atlas
**transferred** from Colin27 (approximate), MNI152 tissue maps.

CPU cost: about (labelled slices x ~1 s + steps x ~0.2 s) for ours and the same again for the UNet,
per case, seed and k, with one torch thread (a 2-core machine: run cases in parallel processes
with ``--threads 1``). ``--save-tuned`` writes ours' weights of the largest k and first seed
(``medsegx.checkpoint.publish_checkpoint``) for ``bench/regression.py``.

Usage::

    python bench/finetune_curve.py [--cases ct_pancreas aal_hippocampus] [--ks 0 1 2 4 8] [--seeds 0 1 2]
        [--eval-slices 16] [--cross aal_hippocampus:mni_hippocampus ...] [--threads 1] [--json out.json]
        [--box-jitter 20 --box-jitter-fraction 0.1] [--loose-eval]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample-data"))

from real_data import load_cases  # noqa: E402

from medsegx.budget import INLOOP_BOX_JITTER_FRACTION, INLOOP_LR, INLOOP_TRAIN_ADAPTERS, EarlyStop, FinetuneBudget, split_for_validation  # noqa: E402
from medsegx.build import build_model  # noqa: E402
from medsegx.checkpoint import publish_checkpoint  # noqa: E402
from medsegx.items import TRAIN_BOX_JITTER, item_from_arrays, jitter_box, side_extents, widen_box  # noqa: E402
from medsegx.slices import StructureBalancedSampler, evenly_spaced, structure_slices  # noqa: E402
from medsegx.steps import EncoderMemo, build_optimizer, train_step, val_step  # noqa: E402
from medsegx.taxonomy import resolve  # noqa: E402
from medsegx.transforms import prepare_volume  # noqa: E402

logger = logging.getLogger("finetune_curve")

DEFAULT_KS = (0, 1, 2, 4, 8)
#: The train task's CPU defaults (apps/medsegx/lib/trainers/medsegx.py): slices drawn per
#: structure per epoch and validation slices per structure.
SLICES_PER_STRUCTURE = 8
VAL_SLICES_PER_STRUCTURE = 2
#: ``--unet-cpu-s``: the UNet's CPU seconds per k (None: the same as ours took on that k).
UNET_CPU_S: float | None = None
#: ``--box-jitter`` / ``--box-jitter-fraction``: the train task's request keys of the same names.
BOX_JITTER = TRAIN_BOX_JITTER
BOX_JITTER_FRACTION = INLOOP_BOX_JITTER_FRACTION
#: ``--loose-eval``: each side of an evaluation box pushed out by this share of its extent plus LOOSE_PX px.
LOOSE_FRACTION = 0.1
LOOSE_PX = 2


@dataclass(frozen=True)
class Case:
    source: str  # a real_data source
    structure: str  # one of its masks


CASES = {
    "ct_pancreas": Case("totalseg_ct", "pancreas"),
    "ct_stomach": Case("totalseg_ct", "stomach"),
    "ct_spleen": Case("totalseg_ct", "spleen"),
    "ct_liver": Case("totalseg_ct", "liver"),
    "mr_pancreas": Case("totalseg_mr", "pancreas"),
    "mr_spleen": Case("totalseg_mr", "spleen"),
    "mr_liver": Case("totalseg_mr", "liver"),
    "aal_hippocampus": Case("colin27_aal", "hippocampus"),
    "aal_amygdala": Case("colin27_aal", "amygdala"),
    "aal_caudate": Case("colin27_aal", "caudate"),
    "aal_putamen": Case("colin27_aal", "putamen"),
    "mni_wm": Case("mni152", "white_matter"),
    # the same AAL structures in a second brain (atlas-transferred labels): targets of --cross
    "mni_hippocampus": Case("mni152_aal", "hippocampus"),
    "mni_amygdala": Case("mni152_aal", "amygdala"),
    "mni_caudate": Case("mni152_aal", "caudate"),
}
DEFAULT_CASES = ("ct_pancreas", "ct_stomach", "ct_spleen", "aal_hippocampus", "aal_amygdala", "aal_caudate")


@dataclass
class Volume:
    """One case's prepared slices and structure mask, and the items of its slices."""

    name: str
    prepared: np.ndarray  # (Z, H, W) uint8, as the infer task prepares it
    mask: np.ndarray  # (Z, H, W) bool
    slices: list[int]  # slices where the structure covers >= 10 px
    context: object
    model_made: bool

    def items(self, model, indices) -> list[dict]:
        return [item_from_arrays(self.prepared[z], self.mask[z], self.context.indices, model.normalize)
                for z in indices]


def load_volume(name: str) -> Volume:
    case = CASES[name]
    (real,) = load_cases([case.source])
    context = resolve(case.structure, real.modality)
    prepared = prepare_volume(real.image, real.modality, context, channels=1)
    mask = real.masks[case.structure]
    slices = structure_slices(mask.astype(np.uint8))[1].tolist()
    return Volume(name, prepared, mask, slices, context, real.model_made)


def evaluation_slices(volume: Volume, eval_count: int, largest_k: int) -> list[int]:
    """``eval_count`` slices evenly spread over the structure, fewer where ``largest_k`` others must stay to label."""
    return evenly_spaced(volume.slices, max(1, min(eval_count, len(volume.slices) - largest_k)), ends=False)


def labelled_sets(volume: Volume, eval_set: list[int], ks, seed: int) -> dict[int, list[int]]:
    """Each k's labelled slices: the first k of a seeded random order of the non-evaluation slices.

    The sets are nested (the 4 labelled slices include the 2), as an annotator's labels
    accumulate; each seed draws another order, so the mean over seeds averages the choice.
    """
    candidates = [z for z in volume.slices if z not in set(eval_set)]
    order = np.random.default_rng(seed).permutation(candidates).tolist()
    return {k: sorted(order[:k]) for k in ks if k > 0}


# -- ours: the train task's budget, sampler, validation and early stop around train_step --------
def finetune(model, items: list[dict], budget: FinetuneBudget, lr: float, seed: int) -> dict:
    """Fine-tune ``model`` in place on one structure's labelled slices; the best-validating weights stay."""
    model.tune_decoder_for({tuple(item["context"].tolist()) for item in items}, adapters=INLOOP_TRAIN_ADAPTERS)
    train_index, val_index = split_for_validation(["structure"] * len(items), budget.holdout_min_slices)
    train_items, val_items = [items[i] for i in train_index], [items[i] for i in val_index]
    plan = budget.plan(len(train_items), min(len(train_items), SLICES_PER_STRUCTURE),
                       held_out=bool(set(val_index) - set(train_index)))
    sampler = StructureBalancedSampler(["structure"] * len(train_items), SLICES_PER_STRUCTURE, seed=seed,
                                       min_length=plan.epoch_steps)
    val_sampler = StructureBalancedSampler(["structure"] * len(val_items), VAL_SLICES_PER_STRUCTURE, shuffle=False)
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(model, lr)
    memo = EncoderMemo()  # as the train task: a frozen encoder runs once per slice
    stopper = EarlyStop(plan.patience, plan.first_stop_epoch)
    cpu_start, steps, epoch = time.process_time(), 0, 0
    for epoch in range(1, plan.epochs + 1):
        for index in sampler:
            item = train_items[index]
            batch = {key: value[None] for key, value in item.items()}
            batch["box"] = jitter_box(item["box"], item["valid_hw"], BOX_JITTER, generator=generator,
                                      max_fraction=BOX_JITTER_FRACTION)[None]
            train_step(model, batch, optimizer, memo=memo)
            steps += 1
        if epoch < plan.first_stop_epoch:
            continue  # not a candidate yet (EarlyStop would ignore it): no validation
        scores = [val_step(model, {key: value[None] for key, value in val_items[i].items()}, memo=memo)["dice"].item()
                  for i in val_sampler]
        if stopper.update(statistics.mean(scores), epoch, model):
            break
    stopper.restore(model)
    return {"cpu_s": time.process_time() - cpu_start, "steps": steps, "planned_steps": plan.steps,
            "epochs": epoch, "best_epoch": stopper.best_epoch, "train_slices": len(train_items),
            "val_slices": len(val_sampler)}


def loosened(item: dict) -> dict:
    """The item with its box as a user's loose box: each side out by ``LOOSE_FRACTION`` of its extent + ``LOOSE_PX``."""
    margins = torch.round(LOOSE_FRACTION * side_extents(item["box"])) + LOOSE_PX
    return {**item, "box": widen_box(item["box"], margins, item["valid_hw"])}


def evaluate(model, items: list[dict], memo: EncoderMemo | None = None) -> list[float]:
    """Dice per item; ``memo``: the case's encoder outputs, shared by every round (a round leaves the encoder as is)."""
    return [val_step(model, {key: value[None] for key, value in item.items()}, memo=memo)["dice"].item()
            for item in items]


# -- the anchor: MONAI Label's single-structure UNet recipe, from scratch -------------------------
def unet_input(item: dict) -> torch.Tensor:
    image = item["image"][:1]
    return ((image - image.min()) / (image.max() - image.min()).clamp_min(1e-8))[None]  # 0..1, (1, 1, 256, 256)


def train_unet(items: list[dict], cpu_budget_s: float, seed: int) -> tuple[torch.nn.Module, int]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
               num_res_units=2, norm="batch")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    steps, start = 0, time.process_time()
    while time.process_time() - start < cpu_budget_s:
        for index in torch.randperm(len(items), generator=generator).tolist():
            optimizer.zero_grad(set_to_none=True)
            loss_function(net(unet_input(items[index])), items[index]["label"][None]).backward()
            optimizer.step()
            steps += 1
            if time.process_time() - start >= cpu_budget_s:
                break
    return net.eval(), steps


@torch.no_grad()
def evaluate_unet(net, items: list[dict]) -> list[float]:
    scores = []
    for item in items:
        pred = net(unet_input(item)).argmax(dim=1)[0].numpy().astype(bool)
        truth = item["label"][0].numpy() > 0.5
        total = pred.sum() + truth.sum()
        scores.append(float(2 * (pred & truth).sum() / total) if total else 1.0)
    return scores


# -- one case ------------------------------------------------------------------------------------
def run_case(name: str, base_model, ks, seeds, budget: FinetuneBudget, lr: float, eval_count: int,
             cross: Volume | None, save_tuned: Path | None, progress=None, loose: bool = False) -> list[dict]:
    """Rows per k: Dice of ours and the UNet per seed; ``progress(rows)`` after every seed's curve.

    ``loose``: ours is also scored with loosened evaluation boxes (``loosened``), as ``ours_loose``.
    """
    volume = load_volume(name)
    largest = max(k for k in ks if k > 0) if any(k > 0 for k in ks) else None
    eval_set = evaluation_slices(volume, eval_count, largest or 0)
    logger.info("%s: %d slices with the structure; evaluation on %s", name, len(volume.slices), eval_set)
    # the encoder is the served one in every round (adapters frozen): its outputs are computed once per case
    memo = None if INLOOP_TRAIN_ADAPTERS else EncoderMemo(capacity=len(eval_set) + eval_count + 8)
    eval_items = volume.items(base_model, eval_set)
    cross_items = cross.items(base_model, evenly_spaced(cross.slices, eval_count, ends=False)) if cross else []
    zero_shot = statistics.mean(evaluate(base_model, eval_items, memo))
    loose_items = [loosened(item) for item in eval_items] if loose else []
    loose_zero_shot = statistics.mean(evaluate(base_model, loose_items, memo)) if loose else None
    cross_zero_shot = statistics.mean(evaluate(base_model, cross_items, memo)) if cross_items else None
    rows = {k: {"case": name, "k": k, "model_made": volume.model_made, "eval_slices": len(eval_set),
                "train_slices": [], "ours": [], "unet": []} for k in sorted(ks)}
    if 0 in rows and cross_items:
        rows[0]["cross_ours"] = []
    for seed in seeds:  # a whole curve per seed: an interrupted run still has complete curves
        sets = labelled_sets(volume, eval_set, ks, seed)
        for k in sorted(ks):
            row = rows[k]
            if k == 0:
                row["ours"].append(zero_shot)
                if loose:
                    row.setdefault("ours_loose", []).append(loose_zero_shot)
                if cross_items:
                    row["cross_ours"].append(cross_zero_shot)
                continue
            model = copy.deepcopy(base_model)
            row["train_slices"].append(sets[k])
            train_items = volume.items(model, sets[k])
            info = finetune(model, train_items, budget, lr, seed)
            unet, unet_steps = train_unet(train_items, UNET_CPU_S or info["cpu_s"], seed)
            row["ours"].append(statistics.mean(evaluate(model, eval_items, memo)))
            row["unet"].append(statistics.mean(evaluate_unet(unet, eval_items)))
            if loose:
                row.setdefault("ours_loose", []).append(statistics.mean(evaluate(model, loose_items, memo)))
            for key, value in (("steps", info["steps"]), ("planned_steps", info["planned_steps"]),
                               ("best_epoch", info["best_epoch"]), ("cpu_s", info["cpu_s"]),
                               ("unet_steps", unet_steps)):
                row.setdefault(key, []).append(value)
            if cross_items:
                row.setdefault("cross_ours", []).append(statistics.mean(evaluate(model, cross_items, memo)))
                row.setdefault("cross_unet", []).append(statistics.mean(evaluate_unet(unet, cross_items)))
            logger.info("%s k=%d seed %d: ours %.3f (%d/%d steps, best epoch %d, %.0f CPU s) unet %.3f (%d steps)",
                        name, k, seed, row["ours"][-1], info["steps"], info["planned_steps"], info["best_epoch"],
                        info["cpu_s"], row["unet"][-1], unet_steps)
            if save_tuned is not None and k == largest and seed == seeds[0]:
                publish_checkpoint(model, save_tuned, {"trained_by": "bench/finetune_curve.py", "case": name,
                                                       "k": k, "seed": seed, "lr": lr})
        if cross_items:  # the whole labelled volume, scored on the other volume only
            whole = rows.setdefault("volume", {"case": name, "k": len(volume.slices), "whole_volume": True,
                                               "model_made": volume.model_made, "cross_ours": [], "cross_unet": []})
            model = copy.deepcopy(base_model)
            volume_items = volume.items(model, volume.slices)
            info = finetune(model, volume_items, budget, lr, seed)
            unet, _ = train_unet(volume_items, UNET_CPU_S or info["cpu_s"], seed)
            whole["cross_ours"].append(statistics.mean(evaluate(model, cross_items, memo)))
            whole["cross_unet"].append(statistics.mean(evaluate_unet(unet, cross_items)))
            logger.info("%s whole volume (%d slices) seed %d: on the other volume ours %.3f unet %.3f (%d steps)",
                        name, len(volume.slices), seed, whole["cross_ours"][-1], whole["cross_unet"][-1],
                        info["steps"])
        if progress is not None:
            progress(list(rows.values()))
    return list(rows.values())


# -- tables --------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def crossing(rows: list[dict]) -> str:
    """The first k at which the UNet's mean Dice reaches ours ("not within k" when it never does)."""
    for row in rows:
        if row["k"] > 0 and row["unet"] and statistics.mean(row["unet"]) >= statistics.mean(row["ours"]):
            return f"k = {row['k']}"
    return f"not within k <= {max(row['k'] for row in rows)}"


def monotonic(rows: list[dict]) -> bool:
    means = [statistics.mean(row["ours"]) for row in sorted(rows, key=lambda r: r["k"])]
    return all(later > earlier for earlier, later in zip(means, means[1:]))


def markdown(rows: list[dict]) -> str:
    unet_budget = f"{UNET_CPU_S:.0f} CPU s" if UNET_CPU_S else "same CPU s"
    loose = any(row.get("ours_loose") for row in rows)
    lines = [f"| case | k | ours Dice (mean ± sd) |{' ours, loose box |' if loose else ''} UNet Dice, {unet_budget} | "
             "steps (planned) | best epoch | CPU s |", "|---|---|---|---|---|---|---|" + ("---|" if loose else "")]
    for row in rows:
        if row.get("whole_volume"):
            continue  # scored on another volume only: cross_table
        star = "*" if row["model_made"] else ""
        steps = (f"{statistics.mean(row['steps']):.0f} ({statistics.mean(row['planned_steps']):.0f})"
                 if row.get("steps") else "0 (zero-shot)")
        best = f"{statistics.mean(row['best_epoch']):.1f}" if row.get("best_epoch") else "-"
        cpu = f"{statistics.mean(row['cpu_s']):.0f}" if row.get("cpu_s") else "-"
        loose_cell = f" {_mean_sd(row['ours_loose'])} |" if loose else ""
        lines.append(f"| {row['case']}{star} | {row['k']} | {_mean_sd(row['ours'])} |{loose_cell} {_mean_sd(row['unet'])} | "
                     f"{steps} | {best} | {cpu} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = ["| case | ours rises monotonically | UNet reaches ours at |", "|---|---|---|"]
    for case in dict.fromkeys(row["case"] for row in rows):
        case_rows = [row for row in rows if row["case"] == case and not row.get("whole_volume")]
        lines.append(f"| {case} | {'yes' if monotonic(case_rows) else 'no'} | {crossing(case_rows)} |")
    return "\n".join(lines)


def cross_table(rows: list[dict], cross_name: str) -> str:
    lines = [f"| tuned on | labelled slices | scored on {cross_name}: ours | UNet | zero-shot |",
             "|---|---|---|---|---|"]
    zero = next((row["cross_ours"] for row in rows if row["k"] == 0 and "cross_ours" in row), None)
    for row in rows:
        if row["k"] > 0 and row.get("cross_ours"):
            labelled = f"all {row['k']} (whole volume)" if row.get("whole_volume") else str(row["k"])
            lines.append(f"| {row['case']} | {labelled} | {_mean_sd(row['cross_ours'])} | "
                         f"{_mean_sd(row['cross_unet'])} | {_mean_sd(zero[:1]) if zero else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global VAL_SLICES_PER_STRUCTURE, UNET_CPU_S, BOX_JITTER, BOX_JITTER_FRACTION  # their flags
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES))
    parser.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=INLOOP_LR, help="the train task's default")
    parser.add_argument("--eval-slices", type=int, default=16,
                        help="evaluation slices per case (fewer where the largest k must still find slices to label)")
    parser.add_argument("--unet-cpu-s", type=float, default=None,
                        help="a fixed CPU budget for the UNet anchor (default: the seconds ours took on that k)")
    parser.add_argument("--val-slices-per-structure", type=int, default=VAL_SLICES_PER_STRUCTURE,
                        help="validation slices per epoch (the train task's val_slices_per_structure)")
    for name in ("base_steps", "steps_per_slice", "max_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                            help=f"FinetuneBudget.{name} (default: the train task's, {getattr(FinetuneBudget, name)})")
    parser.add_argument("--box-jitter", type=int, default=BOX_JITTER,
                        help="training box jitter bound in px (the train task's box_jitter)")
    parser.add_argument("--box-jitter-fraction", type=float, default=BOX_JITTER_FRACTION,
                        help="the bound as a share of the box's side (box_jitter_fraction; 0: --box-jitter for every box, "
                             "the paper's recipe)")
    parser.add_argument("--loose-eval", action="store_true",
                        help=f"also score ours with evaluation boxes {LOOSE_FRACTION:.0%} + {LOOSE_PX} px looser per side")
    parser.add_argument("--cross", nargs="+", default=[], metavar="CASE:OTHER",
                        help="score CASE's models, and one tuned on its whole volume, on OTHER (the same structure "
                             "in another volume)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-tuned", type=Path, default=None, help="checkpoint of the first case's largest k")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    VAL_SLICES_PER_STRUCTURE = args.val_slices_per_structure
    UNET_CPU_S = args.unet_cpu_s
    BOX_JITTER, BOX_JITTER_FRACTION = args.box_jitter, args.box_jitter_fraction
    budget = FinetuneBudget(**{name: getattr(args, name) for name in ("base_steps", "steps_per_slice", "max_steps")
                               if getattr(args, name) is not None})
    base_model = build_model("lite")
    cross_of = dict(pair.partition(":")[::2] for pair in args.cross)
    unknown = [f"{source}:{target}" for source, target in cross_of.items() if target not in CASES]
    if unknown:
        parser.error(f"--cross takes CASE:OTHER with OTHER one of {', '.join(CASES)}; got {unknown}")
    rows: list[dict] = []

    def progress(case_rows: list[dict]) -> None:
        print(markdown(case_rows), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows + case_rows, indent=2))

    for index, name in enumerate(args.cases):
        cross = load_volume(cross_of[name]) if name in cross_of else None
        rows.extend(run_case(name, base_model, sorted(set(args.ks)), args.seeds, budget, args.lr, args.eval_slices,
                             cross, args.save_tuned if index == 0 else None, progress, args.loose_eval))
    print()
    print(markdown(rows))
    print()
    print(summary(rows))
    for source, target in cross_of.items():
        print()
        print(cross_table([row for row in rows if row["case"] == source], target))
    print(f"\n* = model-made (TotalSegmentator) masks. lr {args.lr}, seeds {args.seeds}, budget {budget}, "
          f"box jitter {BOX_JITTER} px, fraction {BOX_JITTER_FRACTION}, torch threads {args.threads}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
