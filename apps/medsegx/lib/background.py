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


def limit_background_cpu(num_threads: int, nice: int) -> None:
    """Bound a background task's CPU use: torch threads, and a lower scheduling priority.

    Only in MONAI Label's background process: in the server process it would slow inference.
    """
    if not in_background_process():
        return
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError as err:
            logger.debug("cannot lower the priority: %s", err)
    logger.info("background task: %d torch thread(s), nice +%d", torch.get_num_threads(), nice)
