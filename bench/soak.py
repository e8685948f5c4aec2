"""Soak: 4 annotators for 10 minutes against one server that trains and publishes meanwhile.

Starts its own MedSegX server (``monailabel start_server`` on 127.0.0.1, a free port) on a
private copy of the app and of the sample studies (``sample-data/datastore``, built if missing),
so nothing in the checkout changes. ``--clients`` threads, each with the stock 3D Slicer
plugin's client (``MONAILabelLib/client.py`` from the monailabel wheel), send back to back a
mix of what an annotator does: a 2D box, a 3D box over ``--slab`` slices, a click without a box
(on its slice, ``propagate: false``), and a label save (``PUT /datastore/label``, a new label each time, under the client's own tag
``soak<N>`` of a few images). After ``--train-after`` of the time one background train task
starts (tiny: one epoch, ``publish: always``); the clients go on until ``--minutes`` have
passed and the train task is over (at most ``--train-grace`` minutes more), then stop.

Prints: requests served, p50 / p95 latency and errors by HTTP status per kind; the model
versions infer answered with (before / after the publish); server RSS (the serving process
only, not the train subprocess) at start, after ``--warmup`` seconds and at the end, with the
growth after warm-up (goal <= 10 %); and whether every label whose save was acknowledged is
byte-identical on disk (and in a download) to the last bytes sent for it (goal: no lost save).
Exit status 1 when a request got a 5xx, a save was lost, or RSS grew more than 10 %.

The lead runs the 10-minute soak alone, on a quiet machine::

    .venv/bin/python bench/soak.py --minutes 10

(``--minutes 1`` checks that the script works; its RSS numbers are mostly warm-up.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "medsegx"
SAMPLE_STUDIES = REPO / "sample-data" / "datastore"
SLICER_CLIENT = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"
MODEL = "medsegx"
IMAGE = "ct_phantom"
SAVE_IMAGES = ("ct_phantom", "ct_phantom_unlabelled", "mni152_t1")
SPLEEN_BOX = [131, 169, 91, 131]  # i0, i1, j0, j1 of the sample phantom's spleen (Slicer's roi layout)
SPLEEN_Z = (15, 44)
LIVER_BOX = [17, 99, 56, 128]
LIVER_Z = (8, 47)
TRAIN_REQUEST = {"images": [IMAGE], "max_epochs": 1, "slices_per_structure": 1, "val_slices_per_structure": 1,
                 "publish": "always", "tracking": "None"}
KINDS = ("2d box", "3d box", "clicks", "label save")
START_TIMEOUT_S = 300.0
RSS_GROWTH_GOAL = 0.10


def slicer_client_class():
    """The Slicer plugin's own ``MONAILabelClient`` class (what Slicer runs), loaded from the wheel."""
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", SLICER_CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MONAILabelClient, module.MONAILabelClientException


@dataclass
class Tally:
    """What every client saw, merged under a lock."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    versions: Counter = field(default_factory=Counter)
    last_saved: dict[tuple[str, str], str] = field(default_factory=dict)  # (image, tag) -> sha256 of acked bytes
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, status: int | str, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.statuses[kind][status] += 1
            if status == 200:
                self.latencies[kind].append(seconds)
            elif len(self.errors) < 20:
                self.errors.append(f"{kind}: {status} {detail[:300]}")


class Annotator:
    """One client thread: a fixed random mix of requests until ``stop`` is set."""

    def __init__(self, index: int, url: str, tally: Tally, slab: int, workdir: Path, stop: threading.Event):
        client_class, self.client_error = slicer_client_class()
        self.client = client_class(url, tmpdir=str(workdir))
        self.index, self.tally, self.slab, self.workdir, self.stop = index, tally, slab, workdir, stop
        self.tag = f"soak{index}"
        self.random = random.Random(index)

    def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            kind = KINDS[(turn + self.index) % len(KINDS)]
            start = time.perf_counter()
            try:
                detail = self._request(kind, turn)
                status = 200
            except self.client_error as err:  # the Slicer client puts the status in its message only
                found = re.search(r"Status: (\d+)", str(err))
                status, detail = int(found.group(1)) if found else "client error", str(err)
            except (OSError, ValueError) as err:  # connection refused / reset: the server is gone
                status, detail = "no answer", f"{type(err).__name__}: {err}"
            self.tally.record(kind, status, time.perf_counter() - start, detail)
            turn += 1

    def _request(self, kind: str, turn: int) -> str:
        if kind == "label save":
            return self._save(turn)
        z = self.random.randint(*LIVER_Z)
        if kind == "2d box":
            params = {"label": "liver", "roi": [*LIVER_BOX, z, z]}
        elif kind == "3d box":
            z0 = self.random.randint(SPLEEN_Z[0], SPLEEN_Z[1] - self.slab + 1)
            params = {"label": "spleen", "roi": [*SPLEEN_BOX, z0, z0 + self.slab - 1]}
        else:
            i, j = (LIVER_BOX[0] + LIVER_BOX[1]) // 2, (LIVER_BOX[2] + LIVER_BOX[3]) // 2
            # one slice, as OHIF with "propagate" unticked; a propagated click is a 3D request like the 3D box
            params = {"label": "liver", "foreground": [[i, j, z]], "background": [], "propagate": False}
        result_file, result = self.client.infer(MODEL, IMAGE, params)
        if result_file and os.path.exists(result_file):
            os.unlink(result_file)
        with self.tally.lock:
            self.tally.versions[result.get("model_version", "?")] += 1
        return ""

    def _save(self, turn: int) -> str:
        image = SAVE_IMAGES[turn % len(SAVE_IMAGES)]
        label = np.zeros((48, 48, 16), np.uint8)
        label[self.random.randrange(40):, self.random.randrange(40):, self.random.randrange(12):] = 1 + self.index
        path = self.workdir / f"{self.tag}-{turn}.nii"
        nib.save(nib.Nifti1Image(label, np.eye(4)), path)
        data = path.read_bytes()
        self.client.save_label(image, str(path), tag=self.tag)
        path.unlink()
        with self.tally.lock:
            self.tally.last_saved[(image, self.tag)] = hashlib.sha256(data).hexdigest()
        return ""


class Server:
    """``monailabel start_server`` on a copy of the app and studies in ``root``.

    ``studies``: a folder already in place (``bench/server_infer.py``'s phantom); default a copy
    of the sample studies in ``root / "studies"``.
    """

    def __init__(self, root: Path, extra: list[str], studies: Path | None = None):
        self.root = root
        self.app = root / "app"
        self.studies = studies or root / "studies"
        shutil.copytree(APP_DIR, self.app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
        if studies is None:
            if not SAMPLE_STUDIES.is_dir():
                subprocess.run([sys.executable, str(REPO / "sample-data" / "build_sample_data.py"), "--out",
                                str(SAMPLE_STUDIES)], check=True, stdout=subprocess.DEVNULL)
            shutil.copytree(SAMPLE_STUDIES, self.studies)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env["PATH"] = sysconfig.get_paths()["scripts"] + os.pathsep + env.get("PATH", "")
        env["MONAILABEL_PYEXE"] = sys.executable
        self.log = root / "server.log"
        # the app's launcher, as scripts/start.sh runs it (monailabel.main without the imports the
        # server never uses: docs/MONAILABEL_COMPAT.md #10)
        command = [sys.executable, str(self.app / "lib" / "compat.py"), "start_server", "--app", str(self.app),
                   "--studies", str(self.studies), "--host", "127.0.0.1", "--port", str(self.port), *extra]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                            start_new_session=True)

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited with {self.process.returncode}; log: {self.log}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)  # poll interval
        raise SystemExit(f"server did not answer within {START_TIMEOUT_S:.0f} s; log: {self.log}")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        """Ctrl-C to the server (it stops its own export / scoring children), then kill what is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def train_status(url: str) -> dict:
    response = requests.get(f"{url}/train/", timeout=30)
    return response.json() if response.status_code == 200 else {}


def check_saves(server: Server, tally: Tally) -> list[str]:
    """Every acknowledged save: the file on disk and the download hold the last bytes sent."""
    lost = []
    for (image, tag), digest in sorted(tally.last_saved.items()):
        on_disk = server.studies / "labels" / tag / f"{image}.nii"
        downloaded = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": tag}, timeout=60)
        if not on_disk.is_file() or hashlib.sha256(on_disk.read_bytes()).hexdigest() != digest:
            lost.append(f"{image}/{tag}: file on disk differs from the last acknowledged save")
        elif downloaded.status_code != 200 or hashlib.sha256(downloaded.content).hexdigest() != digest:
            lost.append(f"{image}/{tag}: download ({downloaded.status_code}) differs from the last acknowledged save")
    return lost


def percentile(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the clients run")
    parser.add_argument("--clients", type=int, default=4, help="annotator threads")
    parser.add_argument("--slab", type=int, default=8, help="slices of a 3D box")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds before the warm RSS reading (at most half of --minutes)")
    parser.add_argument("--train-after", type=float, default=0.25, help="fraction of --minutes before training")
    parser.add_argument("--train-grace", type=float, default=10.0,
                        help="minutes the clients go on past --minutes while the train task runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, studies)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.slab < 1 or not 0 <= args.train_after < 1:
        parser.error("--minutes > 0, --clients >= 1, --slab >= 1, 0 <= --train-after < 1")

    root = Path(tempfile.mkdtemp(prefix="medsegx-soak-"))
    server = Server(root, ["--conf", "tracking", "none"])
    tally, stop = Tally(), threading.Event()
    rss: dict[str, float] = {}
    train: dict = {}
    try:
        server.wait()
        rss["start"] = server.rss_mb()
        started = time.monotonic()
        annotators = [Annotator(index, server.url, tally, args.slab, Path(tempfile.mkdtemp(dir=root)), stop)
                      for index in range(args.clients)]
        threads = [threading.Thread(target=annotator.run, daemon=True) for annotator in annotators]
        for thread in threads:
            thread.start()
        end, cap = started + args.minutes * 60, started + (args.minutes + args.train_grace) * 60
        train_at = started + args.minutes * 60 * args.train_after
        warm_at = started + min(args.warmup, args.minutes * 60 / 2)
        while True:
            now = time.monotonic()
            if "after warm-up" not in rss and now >= warm_at:
                rss["after warm-up"] = server.rss_mb()
            if not train and now >= train_at:
                train = {"started_s": round(now - started), "answer": requests.post(
                    f"{server.url}/train/{MODEL}", json=TRAIN_REQUEST, timeout=60).status_code}
            running = train and train_status(server.url).get("status") in ("SUBMITTED", "RUNNING")
            if server.process.poll() is not None or now >= cap or (now >= end and train and not running):
                break
            time.sleep(1)  # poll interval of the supervisor, not of the clients
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
        elapsed = time.monotonic() - started
        rss["end"] = server.rss_mb() if server.process.poll() is None else float("nan")
        stats = requests.get(f"{server.url}/info/", timeout=60).json().get("train_stats", {}).get(MODEL) or {}
        train.update(status=train_status(server.url).get("status"),
                     published=(stats.get("medsegx") or {}).get("model_version"))
        lost = check_saves(server, tally)
    finally:
        stop.set()
        server.stop()

    print(f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f}; {args.clients} clients for "
          f"{elapsed / 60:.1f} min (asked {args.minutes:g}); train task started at {train.get('started_s')} s: "
          f"{train.get('status')}, published {train.get('published')}")
    print()
    print("| kind | served | p50 (s) | p95 (s) | errors by status |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        statuses = tally.statuses.get(kind, Counter())
        errors = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items(), key=str) if status != 200)
        print(f"| {kind} | {statuses.get(200, 0)} | {percentile(tally.latencies[kind], 50)} "
              f"| {percentile(tally.latencies[kind], 95)} | {errors or 'none'} |")
    total_5xx = sum(count for statuses in tally.statuses.values() for status, count in statuses.items()
                    if isinstance(status, int) and status >= 500)
    unanswered = sum(statuses.get("no answer", 0) for statuses in tally.statuses.values())
    growth = (rss["end"] - rss["after warm-up"]) / rss["after warm-up"] if "after warm-up" in rss else float("nan")
    print()
    print(f"infer answers by model version: {dict(tally.versions)}")
    print(f"server RSS (MB): start {rss.get('start', float('nan')):.0f}, after warm-up "
          f"{rss.get('after warm-up', float('nan')):.0f}, end {rss['end']:.0f} ({growth:+.1%} after warm-up; "
          f"goal <= {RSS_GROWTH_GOAL:.0%})")
    print(f"5xx: {total_5xx}; unanswered: {unanswered}; labels checked: {len(tally.last_saved)}, "
          f"lost or changed: {len(lost)}")
    for line in lost + tally.errors[:10]:
        print(f"  {line}")
    if args.keep:
        print(f"kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    failed = total_5xx or unanswered or lost or not growth <= RSS_GROWTH_GOAL
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
