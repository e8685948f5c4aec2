"""Where the server's memory goes: RSS by phase, and the import memory by package.

Two parts, each in processes of its own:

- **imports**: a child process imports what the server imports before it serves
  (``monailabel.app``, then the app's ``main.py``) and charges every module's own RSS growth
  (``/proc/self/status`` ``RssAnon`` and ``RssFile`` around each module load, less the modules
  it imported in turn) to its package; printed: the totals as the stock ``monailabel
  start_server`` imports and as the app's launcher does (``apps/medsegx/lib/compat.py``, which
  skips what the server never uses and defers MONAI Label's DICOM conversion module with
  SimpleITK), and the largest packages of the stock imports, each with the package that first
  imported it (``python -X importtime`` gives the same tree, with times).
- **server**: ``bench/server_infer.py``'s server (``bench/soak.py``'s, the app's defaults:
  OpenVINO, a 64-entry embedding cache, prefetch of 16 slices) on its 512 x 512 x ``--depth``
  int16 CT phantom, driven by the stock Slicer client. After each phase, once the server is
  idle (no prefetch, export or scoring running), the server process's ``VmRSS``, ``RssAnon``,
  ``RssFile`` and peak ``VmHWM`` (``/proc/<pid>/status``): started (imports, app, model built),
  graphs compiled, first 2D box, more 2D boxes (``--boxes`` new slices, each followed by its
  prefetch: with the defaults they fill the 64-entry cache), 3D boxes over ``--slices`` slices.

The server runs through the app's launcher (``bench/soak.py``) and inherits this process's
environment, so an allocator setting is measured as::

    OMP_NUM_THREADS=1 python bench/server_memory.py
    OMP_NUM_THREADS=1 MALLOC_ARENA_MAX=2 python bench/server_memory.py --skip-imports

Memory only: no timings are taken, so a loaded machine does not change the numbers much.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# bench modules import numpy, nibabel, requests: only the server part imports them, not the import child
APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "medsegx"
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
GROUPED = ("monai", "monailabel", "torch")  # packages shown by their first two name parts
ENVIRONMENT = ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def status_mib(pid: int | str = "self") -> dict[str, float]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` (+ ``RssShmem``), ``VmHWM`` of ``/proc/<pid>/status`` in MiB."""
    values = dict.fromkeys(STATUS_FIELDS, 0.0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name = line.split(":")[0]
        if name in STATUS_FIELDS or name == "RssShmem":
            values["RssFile" if name == "RssShmem" else name] += float(line.split()[1]) / 1024
    return values


def app_compat():
    """``apps/medsegx/lib/compat.py`` (standard library imports only), loaded from its file."""
    spec = importlib.util.spec_from_file_location("medsegx_app_compat", APP_DIR / "lib" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_child(skip_unused: bool) -> None:
    """Import as the server does, charging each module load's own RSS growth to its package (JSON on stdout)."""
    import _frozen_importlib as bootstrap  # every new module goes through its _load_unlocked

    load_module = bootstrap._load_unlocked
    own: collections.Counter = collections.Counter()
    first_importer: dict[str, str] = {}
    stack: list[list] = []  # [module name, RSS the modules it imported added]

    def package(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] in GROUPED else parts[0]

    def measured_load(spec):
        before = status_mib()
        group = package(spec.name)
        if group not in first_importer:
            first_importer[group] = next((package(n) for n, _ in reversed(stack) if package(n) != group), "-")
        stack.append([spec.name, 0.0])
        try:
            return load_module(spec)
        finally:
            after = status_mib()
            grown = (after["RssAnon"] - before["RssAnon"]) + (after["RssFile"] - before["RssFile"])
            _, nested = stack.pop()
            own[group] += grown - nested
            if stack:
                stack[-1][1] += grown

    bootstrap._load_unlocked = measured_load
    start = status_mib()
    if skip_unused:  # as the app's launcher does
        compat = app_compat()
        compat.skip_unused_imports()
        compat.defer_dicom_conversion()
    sys.path.insert(0, str(APP_DIR))
    import monailabel.app  # noqa: F401  (what uvicorn imports first)

    after_monailabel = status_mib()
    import main  # noqa: F401  (the app, as MONAI Label's loader imports it)

    bootstrap._load_unlocked = load_module
    json.dump({"start": start, "monailabel.app": after_monailabel, "app": status_mib(),
               "packages": own.most_common(), "first_importer": first_importer}, sys.stdout)


def imports(skip_unused: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, __file__, "--import-child", *(["--skip-unused"] if skip_unused else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_table(top: int) -> None:
    stock, launched = imports(skip_unused=False), imports(skip_unused=True)
    skipped = app_compat().SERVER_UNUSED_PACKAGES
    for how, result in (("the stock `monailabel start_server`", stock),
                        (f"the app's launcher (skipping {', '.join(skipped)}; DICOM conversion deferred)",
                         launched)):
        print(f"Imports as {how}: RSS {result['start']['VmRSS']:.0f} MiB at start, "
              f"{result['monailabel.app']['VmRSS']:.0f} after monailabel.app, {result['app']['VmRSS']:.0f} after the "
              f"app's main.py (anon {result['app']['RssAnon']:.0f}, file {result['app']['RssFile']:.0f}).")
    print()
    print("| package (stock imports) | own RSS at import (MiB) | first imported by |")
    print("|---|---|---|")
    for name, mib in stock["packages"][:top]:
        print(f"| {name} | {mib:.0f} | {stock['first_importer'].get(name, '-')} |")
    print()


class Phases:
    """The server's memory after each phase, read once it is idle."""

    def __init__(self, server):
        self.server = server
        self.rows: list[tuple[str, dict[str, float]]] = []

    def record(self, phase: str, idle: bool = True) -> None:
        if idle:
            self.server.wait_idle()
        self.rows.append((phase, status_mib(self.server.process.pid)))

    def print(self) -> None:
        print("| phase (server idle after it) | VmRSS (MiB) | anon | file | peak VmHWM |")
        print("|---|---|---|---|---|")
        for phase, values in self.rows:
            print(f"| {phase} | {values['VmRSS']:.0f} | {values['RssAnon']:.0f} | {values['RssFile']:.0f} "
                  f"| {values['VmHWM']:.0f} |")


def infer(client, config: dict, label: str, roi_: list[int]) -> dict:
    from server_infer import IMAGE, MODEL

    params = {"label": label, "foreground": [], "background": [], **config, "roi": roi_}
    _, result = client.infer(MODEL, IMAGE, params)
    return result


def server_table(args: argparse.Namespace) -> None:
    from server_infer import BOX, MODEL, Server, roi, slicer_client

    root = Path(tempfile.mkdtemp(prefix="medsegx-server-memory-"))
    server = Server(root, args.depth)
    phases = Phases(server)
    try:
        server.wait()
        phases.record("answering /info (imports, app, model built)", idle=False)
        phases.record("graphs compiled (runtime openvino)")
        (root / "client").mkdir(exist_ok=True)
        client = slicer_client(server.url, str(root / "client"))
        info = client.info()
        config = {k: v[0] if isinstance(v, list) else v for k, v in info["models"][MODEL].get("config", {}).items()}
        infer(client, config, "liver", roi(BOX, 2, 2))
        phases.record("first 2D box (+ prefetch of its neighbours)")
        infer(client, config, "liver", roi(BOX, 2, 2))
        infer(client, config, "spleen", roi(BOX, 2, 2))
        phases.record("cache hit, label switch")
        z = 30
        for _ in range(args.boxes):  # each with its prefetch done (a newer request would cut it short)
            infer(client, config, "liver", roi(BOX, z, z))
            server.wait_idle()
            z += 20
        phases.record(f"{args.boxes} more 2D boxes on new slices (+ prefetch: the cache is full)")
        for depth in args.slices:
            infer(client, config, "liver", roi(BOX, z, z + depth - 1))
            phases.record(f"3D box, {depth} slices")
            z += depth + 20
        sizes = client.info()["medsegx"]
    finally:
        server.stop()
    env = ", ".join(f"{k}={os.environ[k]}" for k in ENVIRONMENT if k in os.environ) or "none"
    print(f"Server (512 x 512 x {args.depth} int16 CT phantom, cache_size {sizes['cache_size']}, prefetch "
          f"{sizes['prefetch_slices']}; environment: {env}):")
    print()
    phases.print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=160, help="slices of the phantom")
    parser.add_argument("--boxes", type=int, default=3, help="2D boxes on new slices after the first")
    parser.add_argument("--slices", type=int, nargs="+", default=[15, 32], help="3D box depths")
    parser.add_argument("--top", type=int, default=20, help="packages listed in the import table")
    parser.add_argument("--skip-imports", action="store_true", help="the server table only")
    parser.add_argument("--import-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-unused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.import_child:
        import_child(args.skip_unused)
        return 0
    if 30 + 20 * args.boxes + sum(d + 20 for d in args.slices) - 20 > args.depth:
        parser.error(f"--depth {args.depth} is too small for {args.boxes} boxes and 3D boxes of {args.slices}")
    if not args.skip_imports:
        import_table(args.top)
    server_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
