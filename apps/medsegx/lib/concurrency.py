"""Inference off the server's event loop, behind a first-come-first-served queue.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as ``async def api_run_inference`` and runs
the whole inference inside it (``monailabel/endpoints/infer.py``: ``api_run_inference`` ->
``run_inference`` -> ``MONAILabelApp.infer`` -> the task; with ``MONAI_LABEL_INFER_CONCURRENCY``
set, ``MONAILabelApp.infer`` still blocks on ``future.result()``). While one request runs, the
event loop serves nothing else: ``/info/``, datastore listings, image downloads, label saves
and train status all wait for it (``docs/MONAILABEL_COMPAT.md`` #6).

:func:`install_in_server` swaps that one route of the served FastAPI app (``monailabel.app:app``,
which ``monailabel start_server`` runs) for :func:`queued_infer`: the same parameters and
answers, upstream's own ``run_inference`` doing the work, but in a worker thread behind an
:class:`InferQueue`:

- one request runs at a time, in the one worker thread (the model's ConMoAE context state is
  shared; the model store's lock keeps checkpoint reloads between requests); the others wait
  in arrival order;
- at most ``--conf infer_queue`` requests wait; one more is answered 503 with ``Retry-After``;
- a client that disconnects leaves the queue, and its running inference is stopped at the
  next ``torch.nn.Module`` call (a global forward pre-hook that raises :class:`InferenceStopped`
  in the worker thread only; the predictor's ``with`` blocks release its locks as it unwinds);
- a run longer than upstream's ``MONAI_LABEL_INFER_TIMEOUT`` (600 s) is stopped the same way
  and answered 504.

The queue also tells the background train task when the server has interactive work: with a
:class:`lib.interactive.InteractiveMarker` it writes ``busy`` when a request is admitted to an
idle queue and ``idle`` when the last one is done, and the trainer pauses between its steps
meanwhile (``lib/interactive.py``, issue 14).

Before a request is queued, :func:`lib.guards.vet_infer_request` checks the client's own
``image`` / ``session_id`` / ``file`` / ``params`` (only the server's studies, uploads and
sessions; ``docs/MONAILABEL_COMPAT.md`` #8), and :func:`install` wraps the served app in
:class:`lib.guards.UploadLimit` (``--conf max_upload_mb``) and serves ``PUT /session/`` through
:func:`lib.guards.checked_create_session` (archives checked before they are unpacked).
"""

import asyncio
import functools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.background import BackgroundTasks
from fastapi.routing import APIRoute
from medsegx.runtime import register_call_hook
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints import infer as upstream
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.utils.app import app_instance

from lib import guards
from lib.interactive import InteractiveMarker

logger = logging.getLogger(__name__)

INFER_PATH = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"
CLIENT_GONE = "client disconnected"
TIME_CAP = "time cap"
#: ``Retry-After`` per queued request before any inference has been timed.
DEFAULT_RUN_ESTIMATE_S = 5.0


class InferenceStopped(Exception):
    """Raised inside the worker thread at the next module call once its request is stopped."""


class ClientGone(HTTPException):
    """The client left before its answer was ready; 499 (nginx's "client closed request"), read by nobody."""

    def __init__(self, detail: str):
        super().__init__(status_code=499, detail=detail)


class _Stop:
    """Why the running request must stop (``None`` while it may go on), and when it must at the latest."""

    def __init__(self, time_cap_s: float):
        self.deadline = time.monotonic() + time_cap_s
        self.reason: str | None = None

    def check(self) -> None:
        if self.reason is None and time.monotonic() > self.deadline:
            self.reason = TIME_CAP
        if self.reason is not None:
            raise InferenceStopped(self.reason)


_worker = threading.local()  # .stop: the _Stop of the request the current thread runs
_hook_lock = threading.Lock()
_hook_installed = False


def _stop_point(module: torch.nn.Module, args: Any) -> None:
    stop = getattr(_worker, "stop", None)
    if stop is not None:
        stop.check()


def _check_stop() -> None:
    _stop_point(None, None)


def _install_stop_hook() -> None:
    """Register :func:`_stop_point` for every module and compiled-graph call once per process; other threads pay one getattr."""
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            torch.nn.modules.module.register_module_forward_pre_hook(_stop_point)
            register_call_hook(_check_stop)  # the OpenVINO graphs run no nn.Module
            _hook_installed = True


def _run_stoppable(stop: _Stop, work: Callable[[], Any]) -> Any:
    _worker.stop = stop
    try:
        stop.check()  # stopped while it was being handed to the thread
        return work()
    finally:
        _worker.stop = None


class InferQueue:
    """Admission for infer requests: one runs in a worker thread, up to ``max_waiting`` wait in order.

    Used from the event loop only (``run``, ``status``); the work runs in the worker thread.

    Args:
        max_waiting: requests that may wait behind the running one; one more gets 503.
        time_cap_s: a run is stopped after this many seconds (504).
        poll_s: how often a waiting or running request checks that its client is still there.
        marker: told when the queue turns busy and idle again (the server's; none in a
            background process or a test of the queue alone); set idle here.
    """

    def __init__(self, max_waiting: int, time_cap_s: float, poll_s: float = 0.25,
                 marker: InteractiveMarker | None = None):
        if max_waiting < 0 or time_cap_s <= 0 or poll_s <= 0:
            raise ValueError(f"InferQueue needs max_waiting >= 0 and positive times, got "
                             f"max_waiting={max_waiting}, time_cap_s={time_cap_s}, poll_s={poll_s}")
        self.max_waiting = max_waiting
        self.time_cap_s = time_cap_s
        self.poll_s = poll_s
        self._busy = False
        self._waiting: deque[asyncio.Future] = deque()
        self._run_seconds: deque[float] = deque(maxlen=8)
        self._counts = {"served": 0, "refused": 0, "stopped": 0}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsegx-infer")
        self.marker = marker
        if marker is not None:
            marker.set(False)  # a server killed mid-request left "busy"
        _install_stop_hook()

    def status(self) -> dict[str, int | float]:
        """JSON-friendly queue state for ``/info``."""
        return {"running": int(self._busy), "waiting": len(self._waiting), "max_waiting": self.max_waiting,
                "time_cap_s": self.time_cap_s, **self._counts}

    def busy(self) -> bool:
        """A request runs or waits (read from any thread: background work yields to requests)."""
        return self._busy or bool(self._waiting)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the recent mean run time for each request ahead."""
        per_run = sum(self._run_seconds) / len(self._run_seconds) if self._run_seconds else DEFAULT_RUN_ESTIMATE_S
        return max(1, math.ceil(per_run * (len(self._waiting) + 1)))

    async def run(self, request: Request, work: Callable[[], Any]) -> Any:
        """Wait for the turn of ``request``, then run ``work()`` in the worker thread and return its result.

        Raises:
            HTTPException: 503 with ``Retry-After`` when ``max_waiting`` requests already wait;
                504 when the run passed the time cap.
            ClientGone: the client disconnected while waiting or running.
            Exception: whatever ``work`` raised (e.g. the task's 4xx ``HTTPException``).
        """
        await self._admit(request)
        future: asyncio.Future | None = None
        stop = _Stop(self.time_cap_s)
        try:
            started = time.monotonic()
            future = asyncio.get_running_loop().run_in_executor(self._executor, _run_stoppable, stop, work)
            result = await self._until_done(request, future, stop)
            self._run_seconds.append(time.monotonic() - started)
            self._counts["served"] += 1
            return result
        finally:
            if future is None or future.done():
                self._hand_over()
            else:  # this task was cancelled while the worker still runs: the slot frees when it stops
                stop.reason = stop.reason or CLIENT_GONE
                future.add_done_callback(self._hand_over_when_done)

    async def _admit(self, request: Request) -> None:
        if not self._busy:
            self._busy = True
            if self.marker is not None:
                self.marker.set(True)
            return
        if len(self._waiting) >= self.max_waiting:
            self._counts["refused"] += 1
            retry_after = self.retry_after_s()
            logger.warning("infer queue full (%d waiting): 503, Retry-After %d s", len(self._waiting), retry_after)
            raise HTTPException(
                status_code=503,
                detail=f"the inference queue is full ({self.max_waiting} waiting behind the running request); "
                f"retry in about {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            while not turn.done():
                await asyncio.wait({turn}, timeout=self.poll_s)
                if not turn.done() and await request.is_disconnected():
                    raise ClientGone(f"{CLIENT_GONE} while waiting for inference")
        except BaseException:
            if turn.done():
                self._hand_over()  # the turn came just as this request left: pass it on
            else:
                self._waiting.remove(turn)
            raise

    async def _until_done(self, request: Request, future: asyncio.Future, stop: _Stop) -> Any:
        while not future.done():
            await asyncio.wait({future}, timeout=self.poll_s)
            if not future.done() and stop.reason is None and await request.is_disconnected():
                stop.reason = CLIENT_GONE
                logger.info("infer client disconnected: stopping its inference")
        try:
            return future.result()
        except InferenceStopped:
            self._counts["stopped"] += 1
            if stop.reason == CLIENT_GONE:
                raise ClientGone(f"{CLIENT_GONE}; inference stopped") from None
            logger.warning("inference stopped after the %.0f s cap (MONAI_LABEL_INFER_TIMEOUT)", self.time_cap_s)
            raise HTTPException(
                status_code=504,
                detail=f"inference stopped after {self.time_cap_s:.0f} s (MONAI_LABEL_INFER_TIMEOUT); "
                "try a smaller box or fewer slices",
            ) from None

    def _hand_over(self) -> None:
        if self._waiting:
            self._waiting.popleft().set_result(None)  # the slot passes straight to the oldest waiter
        else:
            self._busy = False
            if self.marker is not None:
                self.marker.set(False)

    def _hand_over_when_done(self, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: nobody is left to read it
        self._hand_over()


async def queued_infer(
    request: Request,
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[upstream.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """Upstream's ``api_run_inference`` (same parameters, same answers) run through the app's queue.

    The client's ``image`` must be a datastore id, ``session_id`` an existing session, or an
    image uploaded as ``file`` (checked here, while the client's own values are visible:
    upstream turns an upload or a session into a server path before ``MONAILabelApp.infer``).
    """
    queue: InferQueue = request.app.state.medsegx_infer_queue
    instance = app_instance()
    kind, _ = guards.vet_infer_request(image, session_id, file is not None, params, instance.datastore(),
                                       instance.sessions())
    work = functools.partial(_run_vetted, kind, background_tasks, model, image, session_id, params, file, label,
                             output)
    return await queue.run(request, work)


def _run_vetted(kind: str, *args: Any) -> Any:
    with guards.vetted(kind):  # MedSegXApp.infer admits the upload's / session's server path for this run only
        try:
            return upstream.run_inference(*args)
        except MONAILabelException as err:
            if err.error == MONAILabelError.INVALID_INPUT:  # upstream: "no model 'x' available" -> a 500
                raise HTTPException(status_code=404, detail=err.msg) from None
            raise


def install(fastapi_app: FastAPI, queue: InferQueue, max_upload_bytes: int | None = None) -> None:
    """Serve ``POST /infer/{model}`` of ``fastapi_app`` through ``queue``; refuse bodies above ``max_upload_bytes``.

    Adds :func:`queued_infer` as the app's first route: Starlette matches routes in order, so
    it answers before upstream's route, which stays in ``monailabel.endpoints.infer.router``
    untouched. Idempotent: an app rebuilt by ``POST /reload`` only swaps its queue in.
    """
    fastapi_app.state.medsegx_infer_queue = queue
    if max_upload_bytes is not None:
        guards.install_upload_limit(fastapi_app, max_upload_bytes)
    routes = fastapi_app.router.routes
    if any(isinstance(route, APIRoute) and route.endpoint is queued_infer for route in routes):
        return
    fastapi_app.router.add_api_route(guards.SESSION_PATH, guards.checked_create_session, methods=["PUT"],
                                     tags=["Session"], summary=f"{RBAC_USER}Create new session with Image (checked)")
    routes.insert(0, routes.pop())
    fastapi_app.router.add_api_route(INFER_PATH, queued_infer, methods=["POST"], tags=upstream.router.tags,
                                     responses=upstream.router.responses,
                                     summary=f"{RBAC_USER}Run Inference for supported model (queued)")
    routes.insert(0, routes.pop())
    fastapi_app.openapi_schema = None
    logger.info("POST %s runs in a worker thread behind a FIFO queue (%d may wait)", INFER_PATH, queue.max_waiting)


def install_in_server(queue: InferQueue, max_upload_bytes: int | None = None) -> bool:
    """:func:`install` on ``monailabel.app:app`` when this process serves it; False otherwise (CLI, tests)."""
    served = sys.modules.get("monailabel.app")
    if served is None:
        return False
    install(served.app, queue, max_upload_bytes)
    return True
