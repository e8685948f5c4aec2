"""Background training pauses between its steps while the server has interactive work.

Issue 14: while an in-loop round trains in the background, an infer request may take at most
1.5x its idle latency. With the train process at nice 19 alone a 2D box took 1.33x its idle p50
but 1.9x its p95 on 2 cores (``bench/train_round.py``): a request that lands during a training
step shares the cores with it. ``lib/background.py`` adds ``SCHED_IDLE``; this module adds the
cooperative half, across the two processes (the server, and the subprocess MONAI Label starts
for ``POST /train``), through one small file, ``<model_dir>/.interactive``:

- **server** (:class:`InteractiveMarker`, written by ``lib.concurrency.InferQueue`` on the event
  loop): ``busy <wall time>`` when a request is admitted to an idle queue, ``idle <wall time>``
  when the last running or waiting request is done; ``idle`` again when the server starts (a
  server killed mid-request leaves ``busy``). Two small writes per busy spell, each a temporary
  file renamed over the marker, so a reader never sees half a line.
- **trainer** (:class:`InteractiveYield`, called before every optimiser step, every validation
  step and every batch of the baseline validation): returns at once when the marker says idle
  (one small read), and otherwise sleeps in ``poll_s`` (20 ms) polls while a request runs or
  waits, or ended less than ``grace_s`` (0.3 s) ago, so that a client's back-to-back boxes are
  not interleaved with training steps. A step that has started runs on (``SCHED_IDLE`` keeps it
  off the request's cores); every encoder pass of the round's ``EncoderMemo`` happens inside
  such a step, so it needs no hook of its own.
- **never starved**: after ``cap_s`` (30 s) of continuous waiting the trainer proceeds, logs it,
  and does not yield again for ``resume_s`` (5 s): under a stream of requests the round still
  gets 5 s of every 35. Time spent yielding is reported in the round's stats and log.

Wall-clock time (``time.time``) because two processes read it; an age below zero (the clock
stepped back) counts as idle. A marker that cannot be written or read is logged at debug and
counts as idle: it never fails a request or a round.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: The marker's name in the app's model folder (``AppSettings.model_dir``), which both processes know.
MARKER_FILE = ".interactive"
BUSY, IDLE = "busy", "idle"
#: How often a yielding trainer reads the marker again.
YIELD_POLL_S = 0.02
#: A request that ended this recently still counts: the next box of the same annotator follows.
YIELD_GRACE_S = 0.3
#: Continuous waiting after which the trainer proceeds anyway (a long 3D request, a stale marker).
YIELD_CAP_S = 30.0
#: After a capped wait the trainer runs this long without yielding, so a stream of requests cannot stall it.
YIELD_RESUME_S = 5.0


def marker_path(model_dir: str | os.PathLike) -> Path:
    """``<model_dir>/.interactive``: where the server marks interactive work and the trainer looks."""
    return Path(model_dir) / MARKER_FILE


def read_marker(path: str | os.PathLike) -> tuple[str, float] | None:
    """``(BUSY | IDLE, wall time)`` from the marker; ``None`` when it is missing or unreadable."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        logger.debug("interactive marker %s unreadable: %s", path, err)
        return None
    fields = text.split()
    if len(fields) == 2 and fields[0] in (BUSY, IDLE):
        try:
            return fields[0], float(fields[1])
        except ValueError:
            pass
    logger.debug("interactive marker %s holds %r, not a state", path, text[:40])
    return None


class InteractiveMarker:
    """The server's side: writes ``busy`` / ``idle`` with the time (see the module doc).

    Args:
        path: the marker file (:func:`marker_path` of the app's model folder).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._partial = self.path.with_name(f"{self.path.name}.writing")

    def set(self, busy: bool) -> None:
        """Mark the server busy (a request runs or waits) or idle from now on; errors are logged at debug."""
        try:
            self._partial.write_text(f"{BUSY if busy else IDLE} {time.time():.3f}\n")
            os.replace(self._partial, self.path)
        except OSError as err:
            logger.debug("interactive marker %s not written: %s", self.path, err)


class InteractiveYield:
    """The background task's side: waits while the server has interactive work (see the module doc).

    Args:
        path: the marker file the server writes.
        grace_s: a request that ended less than this ago still counts as interactive.
        cap_s: continuous waiting after which :meth:`wait` returns anyway.
        resume_s: after a capped wait, :meth:`wait` returns at once for this long.
        poll_s: sleep between two reads of the marker.

    Attributes:
        yielded_s: seconds spent waiting in all.
        pauses: calls of :meth:`wait` that waited.
        capped: waits that ended at ``cap_s``.
    """

    def __init__(self, path: str | os.PathLike, grace_s: float = YIELD_GRACE_S, cap_s: float = YIELD_CAP_S,
                 resume_s: float = YIELD_RESUME_S, poll_s: float = YIELD_POLL_S):
        if grace_s < 0 or cap_s <= 0 or resume_s < 0 or poll_s <= 0:
            raise ValueError(f"InteractiveYield needs grace_s >= 0, cap_s > 0, resume_s >= 0 and poll_s > 0, got "
                             f"grace_s={grace_s}, cap_s={cap_s}, resume_s={resume_s}, poll_s={poll_s}")
        self.path = Path(path)
        self.grace_s = grace_s
        self.cap_s = cap_s
        self.resume_s = resume_s
        self.poll_s = poll_s
        self.yielded_s = 0.0
        self.pauses = 0
        self.capped = 0
        self._free_until = 0.0  # time.monotonic() before which wait() returns at once (after a capped wait)

    def interactive(self) -> bool:
        """True while a request runs or waits in the server, or ended less than ``grace_s`` ago."""
        state = read_marker(self.path)
        if state is None:
            return False
        kind, stamp = state
        if kind == BUSY:
            return True
        return 0.0 <= time.time() - stamp < self.grace_s

    def wait(self) -> float:
        """Sleep while :meth:`interactive`, at most ``cap_s``; the seconds waited (0.0 when idle)."""
        if time.monotonic() < self._free_until or not self.interactive():
            return 0.0
        start = time.monotonic()
        while True:
            time.sleep(self.poll_s)
            waited = time.monotonic() - start
            if not self.interactive():
                break
            if waited >= self.cap_s:
                self.capped += 1
                self._free_until = time.monotonic() + self.resume_s
                logger.info("background task: the server has had interactive work for %.0f s; going on "
                            "(%.0f s without yielding)", waited, self.resume_s)
                break
        self.pauses += 1
        self.yielded_s += waited
        return waited

    def summary(self) -> dict[str, float | int]:
        """JSON-friendly totals for the task's stats."""
        return {"yielded_s": round(self.yielded_s, 2), "yield_pauses": self.pauses, "yield_capped": self.capped}
