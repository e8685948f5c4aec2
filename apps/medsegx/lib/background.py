"""CPU bounds for the background processes MONAI Label starts for train and scoring tasks."""

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


def _at_least_nice(nice: int) -> None:
    """Raise this process's niceness to ``nice`` (never lowers it: that needs privileges)."""
    if nice <= 0 or not hasattr(os, "getpriority"):
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as err:
        logger.debug("cannot lower the priority: %s", err)


def start_background_low() -> None:
    """In MONAI Label's background process: nice +``BACKGROUND_NICE`` and one torch thread before
    the app is built (``main.py`` calls it at import); in the server process nothing."""
    if in_background_process():
        _at_least_nice(BACKGROUND_NICE)
        torch.set_num_threads(1)


def limit_background_cpu(num_threads: int, nice: int) -> None:
    """Bound a background task's CPU use: torch threads, and a lower scheduling priority.

    Only in MONAI Label's background process: in the server process it would slow inference.
    The niceness is absolute (``nice`` 19 after ``start_background_low``'s 19 stays 19).
    """
    if not in_background_process():
        return
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    _at_least_nice(nice)
    logger.info("background task: %d torch thread(s), nice %d", torch.get_num_threads(),
                os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0)
