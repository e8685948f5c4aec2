"""Does a fine-tuned checkpoint regress the structures it was not trained on? Dice per structure, base vs tuned.

On ``bench/accuracy.py``'s real slices (TotalSegmentator CT / MR with **model-made** masks, Colin27
AAL, MNI152; ``--slices`` per structure, evenly spread, box = the slice mask's bounding box), the
mask the app serves (``Predictor.predict``: the chosen output at the original size) from the
base model (the embedded LiteMedSAM with zero adapters) and from the base model with
``--checkpoint`` loaded (e.g. ``bench/finetune_curve.py --save-tuned``, or the app's published
``model/medsegx.pth``). A structure other than ``--trained`` regresses when its mean Dice falls
by more than ``--tolerance`` (0.01, issue 14). No timing involved.

A published round holds a tuned decoder that decodes only the structures it was trained on
(``MedSegXModel.tune_decoder_for``); ``--unrouted`` serves that decoder to every structure
instead, as rounds did before, to measure what the routing saves on the same training.

Usage::

    python bench/regression.py --checkpoint tuned.pth --trained totalseg_ct/pancreas [--slices 4] [--unrouted]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample-data"))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import bounding_box, pick_slices  # noqa: E402
from real_data import SOURCES, load_cases  # noqa: E402

from medsegx.build import build_model  # noqa: E402
from medsegx.checkpoint import load_checkpoint  # noqa: E402
from medsegx.metrics import dice  # noqa: E402
from medsegx.predictor import Predictor  # noqa: E402
from medsegx.taxonomy import resolve  # noqa: E402
from medsegx.transforms import prepare_volume  # noqa: E402


def unrouted(model) -> None:
    """The tuned decoder as the shared one, for every context: what rounds published before the
    tuned decoder was routed (the same training, ``--unrouted``)."""
    if model.tuned_decoder is not None:
        model.mask_decoder.load_state_dict(model.tuned_decoder.state_dict())
        model.match_state({})


def compare(checkpoint: Path, sources: list[str], slices: int, min_pixels: int,
            route: bool = True) -> list[dict]:
    base = Predictor(build_model("lite"), cache_size=0)
    tuned_model = build_model("lite")
    load_checkpoint(tuned_model, checkpoint)
    if not route:
        unrouted(tuned_model)
    tuned = Predictor(tuned_model, cache_size=0)
    rows = []
    for case in load_cases(sources):
        for structure, volume_mask in case.masks.items():
            context = resolve(structure, case.modality)
            prepared = prepare_volume(case.image, case.modality, context, channels=1)
            scores: dict[str, list[float]] = {"base": [], "tuned": []}
            for z in pick_slices(volume_mask, slices, min_pixels):
                gt, box = volume_mask[z], bounding_box(volume_mask[z])
                for name, predictor in (("base", base), ("tuned", tuned)):
                    scores[name].append(dice(predictor.predict(prepared[z], box, context).mask, gt))
            if scores["base"]:
                rows.append({"structure": f"{case.source}/{structure}", "slices": len(scores["base"]),
                             "base": float(np.mean(scores["base"])), "tuned": float(np.mean(scores["tuned"]))})
                print(f"done {case.source}/{structure}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--trained", nargs="*", default=[], help="source/structure the checkpoint was trained on")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--min-pixels", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unrouted", action="store_true",
                        help="serve the checkpoint's tuned decoder to every structure (the pre-routing behaviour)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = compare(args.checkpoint, args.sources, args.slices, args.min_pixels, route=not args.unrouted)
    print("| structure | slices | base | tuned | change | |")
    print("|---|---|---|---|---|---|")
    regressed = []
    for row in rows:
        change = row["tuned"] - row["base"]
        trained = row["structure"] in args.trained
        flag = "trained on" if trained else ("**regressed**" if change < -args.tolerance else "")
        if flag == "**regressed**":
            regressed.append(row["structure"])
        print(f"| {row['structure']} | {row['slices']} | {row['base']:.3f} | {row['tuned']:.3f} | {change:+.3f} | {flag} |")
    others = [row for row in rows if row["structure"] not in args.trained]
    weights = np.array([row["slices"] for row in others], dtype=float)
    if others:
        base = np.average([row["base"] for row in others], weights=weights)
        tuned = np.average([row["tuned"] for row in others], weights=weights)
        print(f"| **not trained on** | {int(weights.sum())} | {base:.3f} | {tuned:.3f} | {tuned - base:+.3f} | |")
    print(f"\nregressed by more than {args.tolerance}: {', '.join(regressed) if regressed else 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
