"""Idle time encodes the slices next to the last request, so the next box there is a cache hit.

After an infer request on a volume, :class:`NeighbourPrefetcher` gets the prepared volume, the
request's slice range ``[z_first, z_last]``, its context and cache key. One daemon thread then
encodes the neighbouring slices, nearest first and alternating sides (``z_last + 1``,
``z_first - 1``, ``z_last + 2``, ...), ``--conf prefetch_slices`` of them at most (default 16,
each a cache entry of 4 MiB for lite), through ``Predictor.prefetch``:

- it encodes only while no infer request runs or waits (``busy``, the infer queue's state),
  asked before every slice: a new request waits for at most one encoder pass (~0.4 s with
  OpenVINO on 2 cores), never for the rest of the prefetch, which goes on once it is served;
- a newer request's neighbourhood replaces the pending one (only the latest image is worth it);
- each slice runs under the model store's lock (``ModelStore.use_served``) and never loads a
  newer checkpoint: a reload (which clears the cache) waits for the slice, and a prefetch
  scheduled under one model ends as soon as another is served, so no embedding of old weights
  enters the cache after a reload;
- the thread runs at a lower priority (``os.setpriority`` on its own thread id, Linux) for
  the Python side of the work; OpenVINO's own worker threads are shared with requests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.model_store import LoadedModel, ModelStore

logger = logging.getLogger(__name__)

#: Niceness added to the prefetch thread (requests keep theirs).
PREFETCH_NICE = 10
#: How often a prefetch waiting for the server to be idle looks again.
IDLE_POLL_S = 0.05


def neighbour_slices(z_first: int, z_last: int, depth: int, count: int) -> list[int]:
    """Up to ``count`` slices outside ``[z_first, z_last]``, nearest first, after then before the range."""
    order: list[int] = []
    for distance in range(1, depth + 1):
        for z in (z_last + distance, z_first - distance):
            if 0 <= z < depth and len(order) < count:
                order.append(z)
        if len(order) >= count:
            break
    return order


@dataclass(frozen=True)
class _Work:
    volume: np.ndarray
    slices: list[int]
    context: Any
    key: Hashable
    loaded: LoadedModel


class NeighbourPrefetcher:
    """Encodes the neighbours of the last request's slices while the server is idle.

    Args:
        store: the process's model store (its predictor and cache).
        count: slices per request (``--conf prefetch_slices``); 0 disables the prefetcher.
        busy: true while an infer request runs or waits (``InferQueue.busy``); none: never busy.
    """

    def __init__(self, store: ModelStore, count: int, busy: Callable[[], bool] | None = None):
        self.store = store
        self.count = count
        self.busy = busy or (lambda: False)
        self._work: _Work | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.encoded = 0  # slices encoded since start (for /info and the tests)
        self.running = False

    def status(self) -> dict[str, int | bool]:
        return {"prefetch_slices": self.count, "encoded": self.encoded, "running": self.running,
                "pending": self._work is not None}

    def schedule(self, volume: np.ndarray, z_first: int, z_last: int, context: Any, key: Hashable,
                 loaded: LoadedModel) -> None:
        """Queue the neighbours of ``[z_first, z_last]`` of a request served by ``loaded`` (replacing any pending work)."""
        if self.count <= 0:
            return
        slices = neighbour_slices(z_first, z_last, volume.shape[0], self.count)
        if not slices:
            return
        with self._wake:
            self._work = _Work(volume, slices, context, key, loaded)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="medsegx-prefetch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _next(self) -> Iterator[_Work]:
        while True:
            with self._wake:
                while self._work is None:
                    self._wake.wait()
                work, self._work = self._work, None
            yield work

    def _loop(self) -> None:
        if hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
            except OSError as err:
                logger.debug("prefetch thread keeps its priority: %s", err)
        for work in self._next():
            try:
                self._run(work)
            except Exception:  # a prefetch is an optimisation: log it, keep serving
                logger.exception("prefetch of %s failed", work.key)

    def _wait_idle(self) -> bool:
        """Wait while a request runs or waits; False when newer work replaced this one meanwhile."""
        while self.busy():
            if self._work is not None:
                return False
            time.sleep(IDLE_POLL_S)
        return self._work is None

    def _run(self, work: _Work) -> None:
        self.running = True
        try:
            for z in work.slices:
                if not self._wait_idle():  # yields to every request; a newer neighbourhood wins
                    return
                with self.store.use_served() as loaded:  # a reload waits for this slice, never mixes with it
                    if loaded is not work.loaded:  # another model (or a failed reload) is served now
                        return
                    self.encoded += loaded.predictor.prefetch(work.volume, [z], work.context, work.key)
        finally:
            self.running = False
