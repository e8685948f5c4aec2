"""Latency of the other endpoints while inference runs (``docs/MONAILABEL_COMPAT.md`` #6).

Against a running MedSegX server on this machine (``bash scripts/start.sh``; loopback only),
``--probe-clients`` threads each send ``--rounds`` rounds of the five calls an annotator's
client makes besides inference -- ``GET /info/``, ``GET /datastore/?output=all``, an image
download, ``PUT /datastore/label`` (tag ``bench``, removed at the end) and ``GET /train/`` --
first with the server idle, then while ``--infer-clients`` threads keep it busy with box
requests on ``ct_phantom`` (one of them a 3D box over ``--slab`` slices, the others 2D boxes on
changing slices, so most requests miss the embedding cache). A refused infer request (503)
waits ``Retry-After`` before its next try. Prints a markdown table of p50 / p95 per call.

Run: ``python bench/concurrency.py [--url http://127.0.0.1:8000]``; it stops by itself after
``--seconds`` (the infer clients finish their current request).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from urllib.parse import urlparse

import numpy as np
import requests

IMAGE = "ct_phantom"
LABELLED = "ct_phantom"  # has a final label in the sample datastore; re-saved under tag "bench"
BENCH_TAG = "bench"
SPLEEN_BOX = [131, 169, 91, 131]  # i0, i1, j0, j1 of the sample phantom's spleen (Slicer's roi layout)
SPLEEN_Z = (15, 44)
LIVER_BOX = [17, 99, 56, 128]
LIVER_Z = (8, 47)


class Probes:
    """The non-inference calls of one client, timed; ``latencies[name]`` in seconds."""

    def __init__(self, url: str, label_file: str):
        self.url = url
        with open(label_file, "rb") as label:
            self.label_bytes = label.read()
        self.session = requests.Session()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, int] = defaultdict(int)

    def round(self) -> None:
        label_bytes = self.label_bytes
        calls = {
            "GET /info/": lambda: self.session.get(f"{self.url}/info/"),
            "GET /datastore/?output=all": lambda: self.session.get(f"{self.url}/datastore/", params={"output": "all"}),
            "GET /datastore/image": lambda: self.session.get(f"{self.url}/datastore/image", params={"image": IMAGE}),
            "PUT /datastore/label": lambda: self.session.put(
                f"{self.url}/datastore/label", params={"image": LABELLED, "tag": BENCH_TAG},
                files={"label": (f"{LABELLED}.nii.gz", label_bytes)}),
            "GET /train/": lambda: self.session.get(f"{self.url}/train/"),  # 404 until a train task ran
        }
        for name, call in calls.items():
            start = time.perf_counter()
            answer = call()
            self.latencies[name].append(time.perf_counter() - start)
            if answer.status_code not in (200, 404):
                self.failures[name] += 1


class InferLoad:
    """``clients`` threads sending box requests back to back until ``stop`` is set."""

    def __init__(self, url: str, clients: int, slab: int):
        self.url = url
        self.clients = clients
        self.slab = slab
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.refused = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(index,), daemon=True) for index in range(clients)]

    def _params(self, index: int, turn: int) -> dict:
        if index == 0:  # the radiologist with the 3D box
            z0 = SPLEEN_Z[0] + turn % max(1, SPLEEN_Z[1] - SPLEEN_Z[0] - self.slab + 2)
            return {"label": "spleen", "roi": [*SPLEEN_BOX, z0, z0 + self.slab - 1]}
        z = LIVER_Z[0] + (turn * self.clients + index) % (LIVER_Z[1] - LIVER_Z[0] + 1)
        return {"label": "liver", "roi": [*LIVER_BOX, z, z]}

    def _client(self, index: int) -> None:
        session, turn = requests.Session(), 0
        while not self.stop.is_set():
            start = time.perf_counter()
            answer = session.post(f"{self.url}/infer/medsegx", params={"image": IMAGE, "output": "json"},
                                  data={"params": json.dumps(self._params(index, turn))})
            with self.lock:
                if answer.status_code == 200:
                    self.latencies.append(time.perf_counter() - start)
                elif answer.status_code == 503:
                    self.refused += 1
                else:
                    self.errors.append(f"{answer.status_code} {answer.text[:200]}")
            if answer.status_code == 503:
                self.stop.wait(float(answer.headers.get("Retry-After", "1")))
            turn += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, timeout_s: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def run_probes(url: str, label_file: str, clients: int, rounds: int, deadline: float) -> list[Probes]:
    """``clients`` threads of ``rounds`` rounds each, at the same time; stops early at ``deadline``."""
    probes = [Probes(url, label_file) for _ in range(clients)]

    def client(probe: Probes) -> None:
        for _ in range(rounds):
            if time.monotonic() > deadline:
                return
            probe.round()

    threads = [threading.Thread(target=client, args=(probe,), daemon=True) for probe in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return probes


def merged(probes: list[Probes]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, int] = defaultdict(int)
    for probe in probes:
        for name, values in probe.latencies.items():
            latencies[name].extend(values)
        for name, count in probe.failures.items():
            failures[name] += count
    return {name: np.asarray(values) for name, values in latencies.items()}, failures


def queue_status(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=30).json()["medsegx"]["inference"]


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)  # poll interval
    return False


def loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        is_loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise SystemExit(f"--url {url}: this benchmark only talks to a server on this machine (127.0.0.1)")
    return url.rstrip("/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a MedSegX server on this machine")
    parser.add_argument("--probe-clients", type=int, default=3, help="clients calling the other endpoints at once")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the five calls per probe client and phase")
    parser.add_argument("--infer-clients", type=int, default=4, help="clients sending box requests back to back")
    parser.add_argument("--slab", type=int, default=12, help="slices of the one 3D box client's box")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop probing after this long in all")
    args = parser.parse_args(argv)
    if min(args.probe_clients, args.rounds, args.infer_clients, args.slab) < 1 or args.seconds <= 0:
        parser.error("counts must be >= 1 and --seconds > 0")
    url = loopback(args.url)
    deadline = time.monotonic() + args.seconds

    label = requests.get(f"{url}/datastore/label", params={"label": LABELLED, "tag": "final"}, timeout=60)
    label.raise_for_status()
    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as label_file:
        label_file.write(label.content)
    load = InferLoad(url, args.infer_clients, args.slab)
    try:
        idle, idle_failures = merged(run_probes(url, label_file.name, args.probe_clients, args.rounds, deadline))
        load.start()
        if not wait_until(lambda: queue_status(url)["running"] == 1, 60):
            raise SystemExit("no inference started within 60 s; is the server the MedSegX app?")
        busy, busy_failures = merged(run_probes(url, label_file.name, args.probe_clients, args.rounds, deadline))
        status_under_load = queue_status(url)
    finally:
        load.finish(timeout_s=600)
        requests.delete(f"{url}/datastore/label", params={"id": LABELLED, "tag": BENCH_TAG}, timeout=60)
        os.unlink(label_file.name)

    print(f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f}; {args.probe_clients} probe clients "
          f"x {args.rounds} rounds per phase; busy: {args.infer_clients} infer clients (one 3D box of {args.slab} "
          f"slices), queue at the end of the busy phase: {status_under_load}")
    print()
    print("| call | idle p50 (s) | idle p95 (s) | busy p50 (s) | busy p95 (s) | calls idle / busy | failed |")
    print("|---|---|---|---|---|---|---|")
    for name in idle:
        quiet, loaded = idle[name], busy.get(name, np.asarray([np.nan]))
        failed = idle_failures.get(name, 0) + busy_failures.get(name, 0)
        print(f"| {name} | {np.percentile(quiet, 50):.3f} | {np.percentile(quiet, 95):.3f} "
              f"| {np.percentile(loaded, 50):.3f} | {np.percentile(loaded, 95):.3f} | {len(quiet)} / {len(loaded)} "
              f"| {failed} |")
    if load.latencies:
        served = np.asarray(load.latencies)
        print(f"| POST /infer/medsegx (load) | | | {np.percentile(served, 50):.3f} | {np.percentile(served, 95):.3f} "
              f"| {len(served)} served, {load.refused} refused (503) | {len(load.errors)} |")
    for error in load.errors[:5]:
        print(f"infer error: {error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
