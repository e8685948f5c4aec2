"""The interactive protocol: a 3D box, then 5 corrective clicks, through a real server and stock clients.

The protocol is the CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation"
challenge's (JunMa11/CVPR-MedSegFMCompetition, ``CVPR25_iter_eval.py``, Apache-2.0), driven
through our server on 127.0.0.1 the way each stock client sends it:

- ``slicer``: the 3D Slicer plugin's own ``MONAILabelLib/client.py`` (from the monailabel wheel).
  Round 0 sends the structure's 3D bounding box as a Slicer ROI (``roi`` = ``[i0, i1, j0, j1,
  k0, k1]``) with its segment name (``label``); rounds 1..5 each add one click and send the ROI
  with all clicks so far (``foreground`` / ``background`` lists), as the plugin does on every
  auto-run.
- ``ohif``: OHIF v3's ``deepgrow`` point prompts (``PointPrompts.tsx``: ``foreground`` /
  ``background``, no box, no label; the NRRD result options of ``MonaiLabelClient.js``). As the
  challenge scores a case without a box, there is no round 0 (it counts as Dice 0): round 1 is
  the click at the structure's innermost voxel, on an empty mask.

The click rule is the challenge's: the error is ``prediction != ground truth``; its largest
26-connected component is taken; the click goes to the voxel of maximum Euclidean distance
transform inside that component (computed on the component's bounding box padded by 25 %, in
voxels; ties broken with NumPy's generator seeded 42); it is a foreground click where the ground
truth holds the structure, a background click where it does not.

Printed per structure and mode: DSC and NSD (2 mm tolerance, the image's spacing; NSD is 0 where
DSC <= 0.2, as the challenge) per round, DSC_AUC / NSD_AUC (trapezoid over rounds 1..5, x step 1,
so at most 4), the final DSC / NSD, and the seconds per request as the client saw them. Means
over structures close each table; the structures are marked hand-drawn (AAL) or model-made
(TotalSegmentator's own output). Metrics come from ``medsegx.metrics`` (checked against
``monai.metrics`` in ``tests/unit/test_metrics.py``).

The real volumes are fetched on first use into the git-ignored ``sample-data/real/``
(``sample-data/real_data.py``). The server runs on a private copy of the app with those volumes as
its studies (``bench/soak.py``'s ``Server``), with ``--conf labels`` naming the structures.

Usage::

    .venv/bin/python bench/interactive.py [--modes slicer ohif] [--structures totalseg_ct/liver ...]
                                          [--json out.json]

Timing columns depend on the machine's load: run it alone and read ``uptime`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample-data"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import load_cases  # noqa: E402

from medsegx.metrics import dice, nsd  # noqa: E402

MODES = ("slicer", "ohif")
CLICKS = 5
NSD_TOLERANCE_MM = 2.0
#: The challenge computes NSD only where DSC is above this (NSD 0 below).
NSD_MIN_DSC = 0.2
SOURCES = ("totalseg_ct", "totalseg_mr", "colin27_aal")
#: The default structures: TotalSegmentator's reference CT / MR organs (model-made masks) and the
#: hand-drawn AAL deep grey-matter regions of Colin27.
DEFAULT_STRUCTURES = (
    "totalseg_ct/liver", "totalseg_ct/spleen", "totalseg_ct/kidney_left", "totalseg_ct/kidney_right",
    "totalseg_ct/pancreas", "totalseg_ct/stomach", "totalseg_ct/aorta", "totalseg_ct/gallbladder",
    "totalseg_mr/liver", "totalseg_mr/spleen", "totalseg_mr/kidney_left", "totalseg_mr/kidney_right",
    "totalseg_mr/pancreas", "totalseg_mr/stomach", "totalseg_mr/aorta",
    "colin27_aal/hippocampus", "colin27_aal/amygdala", "colin27_aal/caudate", "colin27_aal/putamen",
    "colin27_aal/thalamus",
)


# -- the challenge's click rule ---------------------------------------------------------------
def _padded_edt(component: np.ndarray) -> np.ndarray:
    """EDT of ``component`` on its bounding box padded by 25 % per axis (at least 1 voxel)."""
    coords = np.argwhere(component)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    shape = high - low
    padding = np.maximum((shape * 0.25).astype(int), 1)
    crop = np.zeros(shape + 2 * padding, dtype=np.uint8)
    crop[tuple(slice(p, p + s) for p, s in zip(padding, shape))] = component[tuple(slice(a, b) for a, b in zip(low, high))]
    distance = ndimage.distance_transform_edt(crop)[tuple(slice(p, p + s) for p, s in zip(padding, shape))]
    full = np.zeros(component.shape, dtype=np.float64)
    full[tuple(slice(a, b) for a, b in zip(low, high))] = distance
    return full * component


def next_click(prediction: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int, int], bool] | None:
    """The challenge's next click on ``(Z, H, W)`` masks: ``((z, y, x), foreground)``, or None when perfect."""
    error = prediction != truth
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))  # 26-connected
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(np.argmax(sizes))
    distance = _padded_edt(largest)
    if not distance.any():
        distance = largest.astype(np.float64)
    candidates = np.argwhere(distance == distance.max())
    centre = tuple(int(v) for v in candidates[np.random.RandomState(42).choice(len(candidates))])
    return centre, bool(truth[centre])


def round_metrics(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """(DSC, NSD at 2 mm) as the challenge scores one round."""
    score = dice(prediction, truth)
    surface = nsd(prediction, truth, NSD_TOLERANCE_MM, spacing) if score > NSD_MIN_DSC else 0.0
    return score, surface


def auc(values: list[float]) -> float:
    """Trapezoid over the last ``CLICKS`` rounds, x step 1 (the challenge's DSC_AUC / NSD_AUC)."""
    return float(np.trapz(np.asarray(values[-CLICKS:], dtype=np.float64), dx=1.0))


# -- the structures ---------------------------------------------------------------------------
@dataclass
class Structure:
    name: str  # "source/structure"
    image_id: str  # datastore id on the bench server
    modality: str
    truth: np.ndarray  # (Z, H, W) bool
    spacing: tuple[float, float, float]  # (Z, H, W) mm
    hand_drawn: bool

    @property
    def label(self) -> str:
        return self.name.split("/", 1)[1]


def write_studies(structures: list[str], studies: Path) -> list[Structure]:
    """The volumes of ``structures`` as NIfTI studies (their own affines); the structures' ground truth."""
    sources = sorted({name.split("/", 1)[0] for name in structures})
    cases = {case.source: case for case in load_cases(sources)}
    found = []
    for name in structures:
        source, label = name.split("/", 1)
        case = cases[source]
        if label not in case.masks:
            raise SystemExit(f"{name}: {source} has no {label} (it has {', '.join(case.masks)})")
        path = studies / f"{source}.nii.gz"
        if not path.exists():
            nib.save(nib.Nifti1Image(np.ascontiguousarray(case.image.transpose(2, 1, 0)), case.affine), path)
        found.append(Structure(name, source, case.modality, case.masks[label], case.spacing_zhw, not case.model_made))
    return found


# -- the clients ------------------------------------------------------------------------------
def ijk(zyx: tuple[int, int, int]) -> list[int]:
    """A ``(Z, H, W)`` voxel as the clients' ``[i, j, k]``."""
    z, y, x = zyx
    return [int(x), int(y), int(z)]


def roi_of(truth: np.ndarray) -> list[int]:
    """The structure's 3D bounding box as Slicer's ``[i0, i1, j0, j1, k0, k1]``."""
    coords = np.argwhere(truth)
    (z0, y0, x0), (z1, y1, x1) = coords.min(axis=0), coords.max(axis=0)
    return [int(x0), int(x1), int(y0), int(y1), int(z0), int(z1)]


class SlicerClient:
    """The Slicer plugin's ``MONAILabelClient``: ROI + the segment name + accumulated clicks."""

    def __init__(self, url: str, workdir: Path):
        import soak

        client_class, _ = soak.slicer_client_class()
        self.client = client_class(url, tmpdir=str(workdir), client_id="bench-interactive")

    def segment(self, structure: Structure, roi: list[int] | None, foreground: list, background: list) -> np.ndarray:
        params = {"label": structure.label, "foreground": foreground, "background": background, "propagate": True}
        if roi is not None:
            params["roi"] = roi
        result_file, _ = self.client.infer("medsegx", structure.image_id, params)
        try:
            return np.asarray(nib.load(result_file).dataobj).transpose(2, 1, 0) == 1  # the plugin imports value 1
        finally:
            os.unlink(result_file)


class OhifClient:
    """OHIF v3's deepgrow point prompts: clicks only, NRRD result."""

    def __init__(self, url: str, workdir: Path):
        self.url, self.workdir = url, workdir

    def segment(self, structure: Structure, roi: list[int] | None, foreground: list, background: list) -> np.ndarray:
        import nrrd

        params = {"foreground": foreground, "background": background, "result_extension": ".nrrd",
                  "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
        response = requests.post(f"{self.url}/infer/medsegx", params={"image": structure.image_id, "output": "image"},
                                 files={"params": (None, json.dumps(params))}, timeout=900)
        if response.status_code != 200:
            raise RuntimeError(f"{structure.name}: {response.status_code} {response.text[:300]}")
        path = self.workdir / "result.nrrd"
        path.write_bytes(response.content)
        data, _ = nrrd.read(str(path))
        return data.transpose(2, 1, 0) > 0


# -- the protocol -----------------------------------------------------------------------------
@dataclass
class Run:
    structure: str
    mode: str
    hand_drawn: bool
    dsc: list[float] = field(default_factory=list)  # round 0 (box; 0 without one) .. round 5
    nsd: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    clicks: list[str] = field(default_factory=list)  # "+" foreground / "-" background, per round
    points: list[list[int]] = field(default_factory=list)  # each round's click as [i, j, k]

    @property
    def dsc_auc(self) -> float:
        return auc(self.dsc)

    @property
    def nsd_auc(self) -> float:
        return auc(self.nsd)


def run_protocol(client, structure: Structure, mode: str) -> Run:
    """Round 0 (a box, Slicer only) and 5 click rounds on one structure."""
    run = Run(structure.name, mode, structure.hand_drawn)
    roi = roi_of(structure.truth) if mode == "slicer" else None
    foreground: list[list[int]] = []
    background: list[list[int]] = []
    if roi is not None:
        start = time.perf_counter()
        prediction = client.segment(structure, roi, foreground, background)
        run.seconds.append(time.perf_counter() - start)
    else:
        prediction = np.zeros_like(structure.truth)
        run.seconds.append(float("nan"))
    score, surface = round_metrics(prediction, structure.truth, structure.spacing) if roi is not None else (0.0, 0.0)
    run.dsc.append(score)
    run.nsd.append(surface)
    for _ in range(CLICKS):
        click = next_click(prediction, structure.truth)
        if click is not None:
            (foreground if click[1] else background).append(ijk(click[0]))
            run.clicks.append("+" if click[1] else "-")
            run.points.append(ijk(click[0]))
            start = time.perf_counter()
            prediction = client.segment(structure, roi, foreground, background)
            run.seconds.append(time.perf_counter() - start)
        else:  # perfect: the challenge adds no click and keeps the mask
            run.clicks.append("=")
            run.seconds.append(0.0)
        score, surface = round_metrics(prediction, structure.truth, structure.spacing)
        run.dsc.append(score)
        run.nsd.append(surface)
    return run


# -- the report -------------------------------------------------------------------------------
def table(runs: list[Run], mode: str) -> str:
    runs = [run for run in runs if run.mode == mode]
    if not runs:
        return ""
    head = "| structure | labels | " + " | ".join(["box"] + [f"click {i}" for i in range(1, CLICKS + 1)])
    head += " | DSC_AUC | NSD_AUC | final DSC | final NSD | clicks | s/request (median) |"
    lines = [f"### {mode}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        cells = [f"{value:.3f}" for value in run.dsc]
        timings = [s for s in run.seconds if np.isfinite(s) and s > 0]
        lines.append(f"| {run.structure} | {'hand-drawn' if run.hand_drawn else 'model-made'} | " + " | ".join(cells)
                     + f" | {run.dsc_auc:.2f} | {run.nsd_auc:.2f} | {run.dsc[-1]:.3f} | {run.nsd[-1]:.3f} | "
                     f"{''.join(run.clicks)} | {np.median(timings) if timings else float('nan'):.2f} |")
    mean_dsc = np.mean([run.dsc for run in runs], axis=0)
    lines.append("| **mean** | | " + " | ".join(f"**{v:.3f}**" for v in mean_dsc)
                 + f" | **{np.mean([r.dsc_auc for r in runs]):.2f}** | **{np.mean([r.nsd_auc for r in runs]):.2f}** | "
                 f"**{np.mean([r.dsc[-1] for r in runs]):.3f}** | **{np.mean([r.nsd[-1] for r in runs]):.3f}** | | |")
    # a correction once the image's slices are encoded: after the box (Slicer), after the first click (OHIF)
    first_correction = 1 if mode == "slicer" else 2
    clicks = [s for run in runs for s in run.seconds[first_correction:] if np.isfinite(s) and s > 0]
    if clicks:
        lines.append("")
        lines.append(f"Correction requests (rounds {first_correction}..{CLICKS}, the image encoded): "
                     f"p50 {np.percentile(clicks, 50):.2f} s, p95 {np.percentile(clicks, 95):.2f} s, "
                     f"max {max(clicks):.2f} s over {len(clicks)} requests.")
    worst = [(run.structure, i, run.dsc[i] - run.dsc[i - 1]) for run in runs for i in range(2 if mode == "ohif" else 1,
                                                                                               CLICKS + 1)]
    drops = [w for w in worst if w[2] < -0.02]
    lines.append("")
    lines.append("Rounds where a structure lost more than 0.02 DSC: "
                 + (", ".join(f"{name} round {i} ({delta:+.3f})" for name, i, delta in drops) if drops else "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--structures", nargs="+", default=list(DEFAULT_STRUCTURES),
                        help="source/structure names (sources: " + ", ".join(SOURCES) + ")")
    parser.add_argument("--json", type=Path, help="write every run's rounds here")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (0: leave as is)")
    args = parser.parse_args(argv)
    import soak

    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="medsegx-interactive-") as tmp:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        structures = write_studies(args.structures, studies)
        labels = ",".join(sorted({s.label for s in structures}))
        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        server = soak.Server(root, ["--conf", "tracking", "none", "--conf", "labels", labels], studies=studies)
        runs: list[Run] = []
        try:
            server.wait()
            clients = {"slicer": SlicerClient(server.url, root), "ohif": OhifClient(server.url, root)}
            for mode in args.modes:
                for structure in structures:
                    run = run_protocol(clients[mode], structure, mode)
                    runs.append(run)
                    print(f"{mode:6s} {structure.name:26s} DSC " + " ".join(f"{v:.3f}" for v in run.dsc)
                          + f"  AUC {run.dsc_auc:.2f}  clicks {''.join(run.clicks)}  "
                          + " ".join(f"{s:.1f}" for s in run.seconds) + " s", flush=True)
        finally:
            server.stop()
    print()
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for mode in args.modes:
        print(table(runs, mode))
        print()
    if args.json:
        args.json.write_text(json.dumps([run.__dict__ | {"dsc_auc": run.dsc_auc, "nsd_auc": run.nsd_auc}
                                         for run in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
