"""One in-loop fine-tuning round on 8 labelled slices, and what it does to interactive latency.

Starts its own MONAI Label server (a copy of ``apps/medsegx`` and of the sample datastore in a
temporary folder, so nothing is published into the checkout), labels the CT phantom's liver on
8 evenly spread slices only (``PUT /datastore/label`` of a new image ``round8``, as a client
saves a label; MONAI Label's automatic uncertainty scoring is off, so that nothing else runs)
and runs ``POST /train/medsegx`` with the task's defaults (the background
process MONAI Label starts: one torch thread, nice 19 and ``SCHED_IDLE``, pausing between steps
while a request runs unless ``--no-yield``; ``medsegx.budget`` decides the steps;
``publish: always`` so the round ends in a publish and a model reload).

Latency: one client sends 2D box requests on the liver, a new slice each time (an embedding
cache miss: the encoder runs, what an annotator waits for), ``--think-s`` apart (0: back to back):

(the server runs with ``cache_size 0``, so every request runs the encoder; a cache hit stops
the benchmark):

1. idle, ``--requests`` of them;
2. during the round, until it ends;
3. idle again, once the reloaded model serves on its compiled runtime again.

Prints the round's wall time (``POST`` to done, from the client, and the task's own
``/info`` train stats), the budget it chose, the latency p50 / p95 idle (1 and 3 pooled) and
during training, their ratios, the five slowest boxes of the round, and the load average
(``os.getloadavg``) beside the timings: other work on the machine changes the timings, so read
the ratio, measured in one run.

Run: ``python bench/train_round.py [--requests 8] [--slices 8] [--think-s 1] [--no-yield] [--nice N]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import Server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "round8"
SOURCE = "ct_phantom"
LIVER_BOX = [17, 99, 56, 128]  # i0, i1, j0, j1 of the sample phantom's liver (Slicer's roi layout)
LIVER_Z = (8, 47)


def build_sample_data(out_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("build_sample_data", ROOT / "sample-data" / "build_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return Path(module.build(out_dir)["datastore"])


def start_server(root: Path, studies: Path) -> Server:
    """``bench/soak.py``'s server (the app's launcher) on ``studies``, with no embedding cache (every
    request runs the encoder, what an annotator on a new slice waits for), no prefetch, and no
    uncertainty scoring at start-up or after the round (it would load the "idle" phases)."""
    os.environ["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    server = Server(root, ["--conf", "prefetch_slices", "0", "--conf", "cache_size", "0"], studies=studies)
    server.wait()
    return server


def label_slices(datastore: Path, out: Path, count: int) -> Path:
    """The phantom's liver on ``count`` evenly spread slices (NIfTI k), nothing elsewhere."""
    names = json.loads((datastore / f"{SOURCE}_labels.json").read_text())
    truth = nib.load(datastore / "labels" / "final" / f"{SOURCE}.nii.gz")
    liver = np.asarray(truth.dataobj) == names["liver"]
    present = np.flatnonzero(liver.sum(axis=(0, 1)) >= 10)
    keep = [present[int((part + 0.5) * len(present) / count)] for part in range(count)]
    label = np.zeros(liver.shape, np.uint8)
    label[..., keep] = liver[..., keep]
    nib.save(nib.Nifti1Image(label, truth.affine), out)
    return out


class BoxClient:
    """2D liver boxes on a new slice each time; latencies in seconds, the runtime that answered."""

    def __init__(self, url: str):
        self.url, self.session, self.turn = url, requests.Session(), 0

    def request(self) -> tuple[float, str]:
        """One box request: (seconds, runtime); a cache hit is an error (the server runs without a cache)."""
        z = LIVER_Z[0] + (self.turn * 7) % (LIVER_Z[1] - LIVER_Z[0] + 1)  # stride 7: never a cached neighbour
        self.turn += 1
        start = time.perf_counter()
        answer = self.session.post(f"{self.url}/infer/medsegx", params={"image": IMAGE, "output": "json"},
                                   data={"params": json.dumps({"label": "liver", "roi": [*LIVER_BOX, z, z]})})
        elapsed = time.perf_counter() - start
        answer.raise_for_status()
        latencies = answer.json().get("latencies", {})
        if latencies.get("cache_hit"):
            raise SystemExit("a request hit the embedding cache: the latencies would not be the encoder's")
        return elapsed, str(latencies.get("model", {}).get("runtime", "?"))


def train_status(url: str) -> dict:
    response = requests.get(f"{url}/train/", timeout=30)
    return response.json() if response.status_code == 200 else {}


def idle_latencies(client: BoxClient, count: int, runtime: str | None, think_s: float = 0.0,
                   timeout_s: float = 600) -> list[float]:
    """``count`` idle latencies, after the server answers on ``runtime`` again (a reload recompiles)."""
    deadline = time.monotonic() + timeout_s
    while runtime is not None and time.monotonic() < deadline:
        if client.request()[1] == runtime:
            break
    latencies = []
    for _ in range(count):
        latencies.append(client.request()[0])
        time.sleep(think_s)
    return latencies


def percentiles(values: list[float]) -> str:
    return f"{np.percentile(values, 50):.2f} / {np.percentile(values, 95):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="idle requests before and after the round")
    parser.add_argument("--slices", type=int, default=8, help="labelled slices")
    parser.add_argument("--nice", type=int, default=None, help="the train request's nice (default: the task's)")
    parser.add_argument("--think-s", type=float, default=0.0,
                        help="pause between two box requests (0: back to back; an annotator takes seconds)")
    parser.add_argument("--no-yield", action="store_true",
                        help="the train request's yield_to_infer: false (SCHED_IDLE / nice alone)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datastore = build_sample_data(root / "datastore")
        server = start_server(root, datastore)
        url = server.url
        try:
            label = label_slices(datastore, root / "round8_label.nii.gz", args.slices)
            shutil.copy(datastore / f"{SOURCE}.nii.gz", root / f"{IMAGE}.nii.gz")
            with open(root / f"{IMAGE}.nii.gz", "rb") as image:
                requests.put(f"{url}/datastore/", params={"image": IMAGE},
                             files={"file": (f"{IMAGE}.nii.gz", image)}).raise_for_status()
            with open(label, "rb") as handle:
                requests.put(f"{url}/datastore/label", params={"image": IMAGE, "tag": "final"},
                             data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
                             files={"label": (f"{IMAGE}.nii.gz", handle)}).raise_for_status()
            client = BoxClient(url)
            runtime = None
            for _ in range(4):  # warm-up: first requests load and compile
                runtime = client.request()[1]
            deadline = time.monotonic() + 600  # the compiled runtime is exported in the background at start
            while runtime == "eager" and os.environ.get("MEDSEGX_RUNTIME") != "eager" and time.monotonic() < deadline:
                time.sleep(2)
                runtime = client.request()[1]
            load_before = os.getloadavg()
            idle = idle_latencies(client, args.requests, runtime, args.think_s)

            started = time.perf_counter()
            body = {"images": [IMAGE], "publish": "always", **({"nice": args.nice} if args.nice is not None else {}),
                    **({"yield_to_infer": False} if args.no_yield else {})}
            response = requests.post(f"{url}/train/medsegx", json=body)
            response.raise_for_status()
            boxes: list[tuple[float, str, float]] = []  # (seconds, runtime, at s after the POST) of each box
            while train_status(url).get("status") in ("SUBMITTED", "RUNNING"):
                at = time.perf_counter() - started
                boxes.append((*client.request(), at))
                time.sleep(args.think_s)
            round_s = time.perf_counter() - started
            load_during = os.getloadavg()
            task = train_status(url)
            stats = requests.get(f"{url}/info/", timeout=30).json().get("train_stats", {}).get("medsegx", {})
            idle += idle_latencies(client, args.requests, runtime, args.think_s)
            load_after = os.getloadavg()
        finally:
            server.stop()
        result = stats.get("medsegx", {})
        print(f"round on {args.slices} labelled slices: {task.get('status')} in {round_s:.0f} s (client), "
              f"train task total_time {stats.get('total_time', '?')}; budget {result.get('budget')}; "
              f"epochs run {result.get('epochs')}, best epoch {result.get('best_epoch')}; "
              f"val Dice {result.get('best_val_dice')} vs served {result.get('baseline_val_dice')}; "
              f"published {result.get('published')}; yielded {result.get('yielded_s', '-')} s to requests "
              f"({result.get('yield_pauses', '-')} pauses, {result.get('yield_capped', '-')} capped)")
        print("| infer, 2D box, cache miss | n | p50 / p95 s |")
        print("|---|---|---|")
        print(f"| idle (before + after) | {len(idle)} | {percentiles(idle)} |")
        during = [seconds for seconds, _, _ in boxes]
        if during:
            print(f"| during the round | {len(during)} | {percentiles(during)} |")
            ratio = np.percentile(during, 50) / np.percentile(idle, 50)
            ratio95 = np.percentile(during, 95) / np.percentile(idle, 95)
            print("slowest during the round: " + ", ".join(f"{seconds:.2f} s at {at:.0f} s ({answered_by})"
                                                          for seconds, answered_by, at in sorted(boxes)[::-1][:5]))
            print(f"\np50 during / p50 idle = {ratio:.2f}; p95 during / p95 idle = {ratio95:.2f}; "
                  f"think time {args.think_s} s; yield_to_infer {not args.no_yield}; runtime {runtime}; "
                  f"load average (1, 5, 15 min) "
                  f"before {load_before}, at the round's end {load_during}, after {load_after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
