"""The background train task yields to interactive work (``lib/interactive.py``, ``lib/background.py``; issue 14).

The marker and the trainer's waiter on real files and a real ``InferQueue`` (a stand-in request,
as ``test_concurrency.py`` uses), with short grace and cap times; ``SCHED_IDLE`` in a fresh
Python process; then the session server (``medsegx_server``): after a request the app's
``model/.interactive`` says idle. Assertions are about order (the waiter returns after the
marker's idle time plus the grace), never about how fast anything ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lib.concurrency import InferQueue
from lib.interactive import BUSY, IDLE, InteractiveMarker, InteractiveYield, marker_path, read_marker

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "medsegx"
GRACE_S = 1.0  # long, so a test thread that starts late still finds the server interactive


class StandIn:
    """The one thing ``InferQueue`` asks of a Starlette ``Request``."""

    async def is_disconnected(self) -> bool:
        return False


def test_an_idle_missing_or_garbled_marker_costs_no_wait(tmp_path):
    path = marker_path(tmp_path)
    pause = InteractiveYield(path, grace_s=GRACE_S)
    assert pause.wait() == 0.0  # no server has written it yet

    path.write_text(f"{IDLE} {time.time() - 2 * GRACE_S:.3f}\n")
    assert pause.wait() == 0.0
    for garbled in (b"", b"busy", b"busy soon\n", b"working 12.0\n", b"\xff\xfe busy"):
        path.write_bytes(garbled)
        assert read_marker(path) is None and pause.wait() == 0.0
    assert pause.summary() == {"yielded_s": 0.0, "yield_pauses": 0, "yield_capped": 0}


def test_the_queue_marks_busy_while_requests_run_or_wait_and_idle_after(tmp_path):
    path = marker_path(tmp_path)
    path.write_text(f"{BUSY} 1.0\n")  # left by a server killed mid-request
    release = threading.Event()
    seen_by_work: list[str] = []

    def first_request():
        seen_by_work.append(read_marker(path)[0])
        release.wait(30)
        return "first"

    async def main():
        queue = InferQueue(max_waiting=2, time_cap_s=60, poll_s=0.01, marker=InteractiveMarker(path))
        at_start = read_marker(path)[0]
        running = asyncio.create_task(queue.run(StandIn(), first_request))
        waiting = asyncio.create_task(queue.run(StandIn(), lambda: read_marker(path)[0]))
        while queue.status()["waiting"] < 1 or not seen_by_work:
            await asyncio.sleep(0.01)
        while_both = read_marker(path)[0]
        release.set()
        return at_start, while_both, await running, await waiting

    at_start, while_both, first, seen_by_second = asyncio.run(main())
    assert at_start == IDLE  # a new server clears a stale "busy"
    assert seen_by_work == [BUSY] and while_both == BUSY
    assert first == "first" and seen_by_second == BUSY  # the slot passed straight on: no idle in between
    assert read_marker(path)[0] == IDLE
    assert not list(tmp_path.glob(".interactive.*"))  # the temporary file was renamed over the marker


def test_a_marker_that_cannot_be_written_breaks_no_request(tmp_path):
    path = marker_path(tmp_path / "missing-folder")

    async def main():
        queue = InferQueue(max_waiting=1, time_cap_s=60, poll_s=0.01, marker=InteractiveMarker(path))
        return await queue.run(StandIn(), lambda: "served"), queue.status()

    served, status = asyncio.run(main())
    assert served == "served" and status["served"] == 1 and status["running"] == 0
    assert not path.exists()


def test_the_trainer_waits_while_a_request_runs_and_for_the_grace_after_it(tmp_path):
    path = marker_path(tmp_path)
    pause = InteractiveYield(path, grace_s=GRACE_S, poll_s=0.01)
    release, waiting = threading.Event(), threading.Event()
    outcome: dict[str, float] = {}

    def trainer():
        waiting.set()
        outcome["waited"] = pause.wait()
        outcome["returned_at"] = time.time()

    def request():
        thread = threading.Thread(target=trainer)
        thread.start()
        waiting.wait(30)
        release.wait(30)
        return thread

    async def main():
        queue = InferQueue(max_waiting=1, time_cap_s=60, poll_s=0.01, marker=InteractiveMarker(path))
        run = asyncio.create_task(queue.run(StandIn(), request))
        while not waiting.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        release.set()
        return await run

    trainer_thread = asyncio.run(main())
    ended = read_marker(path)
    trainer_thread.join(30)
    assert ended[0] == IDLE
    assert outcome["waited"] > 0 and outcome["returned_at"] >= ended[1] + GRACE_S
    assert pause.pauses == 1 and pause.capped == 0 and pause.yielded_s == outcome["waited"]
    assert pause.wait() == 0.0  # the grace is over: the next step goes on at once


def test_a_wait_ends_at_the_cap_and_the_round_then_runs_on_for_a_while(tmp_path, caplog):
    path = marker_path(tmp_path)
    InteractiveMarker(path).set(True)  # busy for good: a 3D box of minutes, or a server killed mid-request
    pause = InteractiveYield(path, grace_s=GRACE_S, cap_s=0.2, resume_s=60, poll_s=0.01)
    with caplog.at_level("INFO", logger="lib.interactive"):
        waited = pause.wait()
    assert waited >= 0.2 and pause.capped == 1
    assert "going on (60 s without yielding)" in caplog.text
    assert pause.wait() == 0.0 and pause.pauses == 1  # within resume_s it no longer yields

    no_resume = InteractiveYield(path, cap_s=0.1, resume_s=0, poll_s=0.01)
    assert no_resume.wait() >= 0.1 and no_resume.wait() >= 0.1 and no_resume.capped == 2
    assert no_resume.summary()["yield_capped"] == 2


def test_bad_yield_times_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cap_s=0"):
        InteractiveYield(marker_path(tmp_path), cap_s=0)


PRIORITIES = """
import json, os, sys, threading
import torch
before = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
before.start()
from lib.background import lower_priority
lower_priority(19, sched_idle=True)
torch.set_num_threads(2)
torch.ones(512, 512) @ torch.ones(512, 512)  # torch's intra-op pool starts after the call
after = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
after.start()
threads = {tid: {"policy": os.sched_getscheduler(int(tid)), "nice": os.getpriority(os.PRIO_PROCESS, int(tid))}
           for tid in os.listdir("/proc/self/task")}
print(json.dumps({"idle": os.SCHED_IDLE, "threads": threads}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE and per-thread niceness are Linux's")
def test_every_thread_of_a_background_process_runs_at_sched_idle_and_nice_19():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PRIORITIES], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    threads = report["threads"]
    assert len(threads) >= 3  # main, the thread started before, the one started after (and torch's)
    assert {entry["policy"] for entry in threads.values()} == {report["idle"]}, threads
    assert min(entry["nice"] for entry in threads.values()) >= 19, threads


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("chrt") and shutil.which("nice")),
                    reason="needs Linux's SCHED_IDLE and the chrt (util-linux) and nice (coreutils) tools")
def test_monai_label_starts_its_background_tasks_low_from_their_first_instruction(monkeypatch):
    """docs/MONAILABEL_COMPAT.md #11: the command MONAI Label runs for a task starts under SCHED_IDLE, nice 19."""
    from monailabel.utils.async_tasks import utils as task_utils

    from lib import compat

    monkeypatch.setattr(task_utils, "subprocess", subprocess)  # restored after the test
    prefix = compat.start_background_tasks_low(19, sched_idle=True)
    assert prefix == ["chrt", "--idle", "0", "nice", "-n", "19"]
    assert compat.start_background_tasks_low(19, sched_idle=True) == prefix  # idempotent: prefixed once
    probe = "import os; print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.getpriority(os.PRIO_PROCESS, 0))"
    process = task_utils.subprocess.Popen([sys.executable, "-c", probe], stdout=task_utils.subprocess.PIPE,
                                          stderr=task_utils.subprocess.STDOUT, universal_newlines=True)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and output.split() == ["True", "19"], output


# -- the real server ----------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_the_server_marks_its_requests_in_the_model_folder(server, client, sample_data):
    client.infer("medsegx", "ct_phantom", {"label": "liver", "roi": [17, 99, 56, 128, 20, 20]})
    state = read_marker(marker_path(server.app_dir / "model"))
    assert state is not None and state[0] == IDLE, state
