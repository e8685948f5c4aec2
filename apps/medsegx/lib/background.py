"""CPU bounds for the background processes MONAI Label starts for train and scoring tasks.

A background process gets one torch thread, nice 19 and, on Linux, the ``SCHED_IDLE`` policy.
Nice 19 alone was not enough on 2 cores: during an 8-slice round a 2D box took 1.33x its idle
p50 but 1.9x its p95 (``bench/train_round.py``, issue 14 asks for <= 1.5x). A nice-19 task still
gets its CFS share (weight 15 against 1024) and, once it runs, keeps the core until the
scheduler's next tick decides; a ``SCHED_IDLE`` task (weight 3) is preempted as soon as a normal
task wakes up on its core, so an infer request's threads start at once. Unprivileged processes
may enter ``SCHED_IDLE`` (``sched(7)``); elsewhere, or when refused, nice 19 stays, logged at
debug. The other half of issue 14, the train task pausing between its steps while the server has
interactive work, is ``lib/interactive.py``.

On Linux both the niceness and the policy belong to each *thread*: ``setpriority`` /
``sched_setscheduler`` with id 0 change the calling thread only, and a new thread inherits its
creator's. :func:`lower_priority` therefore sets every thread in ``/proc/self/task`` (importing
torch already started one), and the threads created later (torch's intra-op pool, created on the
first parallel region; data loader threads) inherit it from the main thread.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

#: Module run by MONAI Label for background train / scoring tasks (``async_tasks/utils.py``).
_BACKGROUND_MAIN = "monailabel.interfaces.utils.app"


def in_background_process() -> bool:
    """True inside the subprocess MONAI Label starts for ``POST /train`` (not in the server)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec is not None and spec.name == _BACKGROUND_MAIN


#: Niceness of MONAI Label's background processes from their first line (the train and scoring
#: tasks' own default): the start-up uncertainty scoring builds the app and a model before its task
#: runs, seconds of CPU that must not slow the server's first interactive request. 19, the lowest
#: priority: during an 8-slice round (``bench/train_round.py``) a 2D box took 1.33x its idle p50 at
#: nice 19 and 1.67x at nice 10, on 2 cores.
BACKGROUND_NICE = 19

#: Background processes also run under ``SCHED_IDLE`` (Linux): a ``SCHED_IDLE`` task is preempted
#: at once when a normal task wakes on its core, a nice-19 task is not (it keeps a small CFS share
#: and runs on until the next tick); with nice 19 alone a box's p95 was 1.9x its idle p95 during a
#: round. The train task's ``sched_idle`` request key asks to leave it for one run; an unprivileged
#: thread may leave ``SCHED_IDLE`` only within its ``RLIMIT_NICE`` (usually not at nice 19), so set
#: this to False to never enter it (``start_background_low`` applies it at import).
BACKGROUND_SCHED_IDLE = True

_LOWER_POLICIES = ("SCHED_OTHER", "SCHED_BATCH")  # policies SCHED_IDLE may replace (never a real-time one)


def _thread_ids() -> list[int]:
    """Native ids of this process's threads (Linux ``/proc``); ``[0]`` (the calling thread) elsewhere."""
    try:
        return sorted(int(tid) for tid in os.listdir("/proc/self/task"))
    except (OSError, ValueError):
        return [0]


def _at_least_nice(nice: int, thread_id: int = 0) -> None:
    """Raise a thread's niceness to ``nice`` (never lowers it: that needs privileges)."""
    if nice <= 0 or not hasattr(os, "getpriority"):
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, thread_id) < nice:
            os.setpriority(os.PRIO_PROCESS, thread_id, nice)
    except OSError as err:  # also a thread that ended since it was listed
        logger.debug("cannot lower the priority of thread %d: %s", thread_id, err)


def _set_sched_idle(enabled: bool, thread_id: int = 0) -> None:
    """Put a thread under ``SCHED_IDLE`` (or back under ``SCHED_OTHER``); a no-op where Linux's policies are missing."""
    if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_setscheduler"):
        return
    try:
        current = os.sched_getscheduler(thread_id)
        lower = {getattr(os, name) for name in _LOWER_POLICIES if hasattr(os, name)}
        if enabled and current in lower:
            os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
        elif not enabled and current == os.SCHED_IDLE:
            os.sched_setscheduler(thread_id, os.SCHED_OTHER, os.sched_param(0))
    except OSError as err:  # refused (a sandbox's seccomp filter), or the thread ended since it was listed
        logger.debug("thread %d keeps its scheduling policy (nice only): %s", thread_id, err)


def lower_priority(nice: int, sched_idle: bool = BACKGROUND_SCHED_IDLE) -> None:
    """Every thread of this process at niceness >= ``nice`` and, if ``sched_idle``, under ``SCHED_IDLE``.

    Threads created afterwards inherit both from their creator. Errors are logged at debug and
    leave that thread as it was: a lower priority is best effort and never stops a task.
    """
    for thread_id in _thread_ids():
        _at_least_nice(nice, thread_id)
        _set_sched_idle(sched_idle, thread_id)


def scheduling_policy() -> str:
    """The calling thread's policy for logs: ``"SCHED_IDLE"``, ``"SCHED_OTHER"``, ... (``"default"`` off Linux)."""
    if not hasattr(os, "sched_getscheduler"):
        return "default"
    policy = os.sched_getscheduler(0)
    names = {getattr(os, name): name for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, name)}
    return names.get(policy, str(policy))


def start_background_low() -> None:
    """In MONAI Label's background process: nice +``BACKGROUND_NICE``, ``SCHED_IDLE`` and one torch thread
    before the app is built (``main.py`` calls it at import, before torch's intra-op pool exists);
    in the server process nothing."""
    if in_background_process():
        lower_priority(BACKGROUND_NICE, BACKGROUND_SCHED_IDLE)
        torch.set_num_threads(1)


def limit_background_cpu(num_threads: int, nice: int, sched_idle: bool = BACKGROUND_SCHED_IDLE) -> None:
    """Bound a background task's CPU use: torch threads, a lower priority, ``SCHED_IDLE`` or not.

    Only in MONAI Label's background process: in the server process it would slow inference.
    The niceness is absolute (``nice`` 19 after ``start_background_low``'s 19 stays 19);
    ``sched_idle`` false puts the threads back under ``SCHED_OTHER`` where the kernel allows it
    (see ``BACKGROUND_SCHED_IDLE``).
    """
    if not in_background_process():
        return
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    lower_priority(nice, sched_idle)
    logger.info("background task: %d torch thread(s), nice %d, %s", torch.get_num_threads(),
                os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0, scheduling_policy())
