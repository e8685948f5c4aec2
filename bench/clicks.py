"""Clicks without a box: Dice after 1, 2 and 3 clicks against a box prompt, per method.

A radiologist in Slicer or OHIF often clicks on a structure instead of drawing a box. This
benchmark picks how ``Predictor.predict_clicks`` turns clicks into a mask, on the sample
studies (``sample-data/build_sample_data.py``):

- ``ct_phantom``: synthetic abdominal CT (liver, spleen, kidneys, aorta; exact phantom masks);
- ``mni152_t1``: the real MNI152 T1 brain template with nilearn's grey / white matter maps.

Per structure, on ``--slices`` evenly spaced slices through it (axial, the (Z, H, W) frame
the app uses), with the embedded LiteMedSAM (ConMoAE adapters inert):

- ``box``: the ground-truth bounding box (the anchor: what a drawn box gives);
- for each method in ``Predictor.CLICK_METHODS``: click 1 at the deepest interior point of
  the structure (the maximum of its distance transform), each next click at the deepest
  point of the largest error region of the previous mask (foreground where it missed,
  background where it spilled: the usual simulated-user protocol of DeepGrow / SAM);
- ``3d``: the same first click on the structure's middle slice, propagated through the
  volume (``medsegx.propagation.predict_3d_clicks``), against ``predict_3d`` with the structure's 3D
  bounding box; 3D Dice over the volume.

No timing is involved, so the load of the machine does not matter.

Usage::

    python bench/clicks.py [--slices 5] [--structures liver spleen white_matter] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample-data"))

from build_sample_data import build  # noqa: E402

from medsegx.build import build_model  # noqa: E402
from medsegx.metrics import dice  # noqa: E402
from medsegx.predictor import CLICK_METHODS, Predictor  # noqa: E402
from medsegx.propagation import predict_3d, predict_3d_clicks  # noqa: E402
from medsegx.taxonomy import resolve  # noqa: E402
from medsegx.transforms import prepare_volume  # noqa: E402

CASES = {"ct_phantom": "CT", "mni152_t1": "MRI"}
CLICKS = (1, 2, 3)


def load_case(datastore: Path, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ``(Z, H, W)`` and per-structure ``(Z, H, W)`` bool masks (the app's frame)."""
    image = np.asarray(nib.load(datastore / f"{name}.nii.gz").dataobj).transpose(2, 1, 0)
    label = np.asarray(nib.load(datastore / "labels" / "final" / f"{name}.nii.gz").dataobj).transpose(2, 1, 0)
    names = json.loads((datastore / f"{name}_labels.json").read_text())
    return image, {structure: label == value for structure, value in names.items()}


def deepest_point(region: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of the interior point farthest from the edge of the largest component."""
    components, count = ndimage.label(region)
    if count > 1:
        sizes = ndimage.sum(region, components, index=range(1, count + 1))
        region = components == (1 + int(np.argmax(sizes)))
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(col), float(row)


def next_click(mask: np.ndarray, gt: np.ndarray) -> tuple[float, float, int]:
    missed, spilled = gt & ~mask, mask & ~gt
    largest = {}
    for label, error in ((1, missed), (0, spilled)):
        components, count = ndimage.label(error)
        largest[label] = max(ndimage.sum(error, components, range(1, count + 1)), default=0) if count else 0
    label = 1 if largest[1] >= largest[0] else 0
    x, y = deepest_point(missed if label == 1 else spilled)
    return x, y, label


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def evaluate_slices(predictor: Predictor, prepared, gt, context, key, slices) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {"box": []}
    for z in slices:
        image = prepared[z]
        scores["box"].append(dice(predictor.predict(image, bounding_box(gt[z]), context, key=key,
                                                    slice_index=z).mask, gt[z]))
        for method in CLICK_METHODS:
            points = [(*deepest_point(gt[z]), 1)]
            for clicks in CLICKS:
                prediction = predictor.predict_clicks(image, points, context, key=key, slice_index=z, method=method)
                scores.setdefault(f"{method}/{clicks}", []).append(dice(prediction.mask, gt[z]))
                if clicks < CLICKS[-1]:
                    points.append(next_click(prediction.mask, gt[z]))
    return scores


def evaluate_3d(predictor: Predictor, prepared, gt, context, key) -> dict[str, float]:
    z_nonempty = np.flatnonzero(gt.any(axis=(1, 2)))
    box = bounding_box(gt.any(axis=0))
    by_box = predict_3d(predictor, prepared, (*box, int(z_nonempty[0]), int(z_nonempty[-1])), context, key=key)
    middle = int(z_nonempty[len(z_nonempty) // 2])
    click = (*deepest_point(gt[middle]), 1)
    by_click = predict_3d_clicks(predictor, prepared, [click], middle, context, key=key)
    return {"3d box": dice(by_box.mask, gt), "3d click": dice(by_click.mask, gt)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=5, help="slices per structure (evenly spaced)")
    parser.add_argument("--structures", nargs="*", help="only these structures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        datastore = Path(tmp) / "datastore"
        build(datastore)
        predictor = Predictor(build_model("lite"), cache_size=128)
        rows = []
        for case, modality in CASES.items():
            image, masks = load_case(datastore, case)
            for structure, gt in masks.items():
                if args.structures and structure not in args.structures:
                    continue
                context = resolve(structure, modality)
                prepared = prepare_volume(image, modality, context, channels=1)
                z_nonempty = np.flatnonzero(gt.sum(axis=(1, 2)) >= 20)
                picks = z_nonempty[np.linspace(0, len(z_nonempty) - 1, args.slices + 2).round().astype(int)[1:-1]]
                key = (case, structure)
                scores = evaluate_slices(predictor, prepared, gt, context, key, [int(z) for z in picks])
                row = {"case": case, "structure": structure, **{k: float(np.mean(v)) for k, v in scores.items()}}
                row.update(evaluate_3d(predictor, prepared, gt, context, key))
                rows.append(row)
                print(f"done {case}/{structure}", file=sys.stderr, flush=True)

    columns = [k for k in rows[0] if k not in ("case", "structure")]
    print(f"Dice, {args.slices} slices per structure; clicks: deepest point, then largest error region")
    print("| case | structure | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['case']} | {row['structure']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    means = {c: float(np.mean([row[c] for row in rows])) for c in columns}
    print("| **mean** | | " + " | ".join(f"**{means[c]:.3f}**" for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mean": means}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
