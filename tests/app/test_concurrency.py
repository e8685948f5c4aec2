"""Inference off the event loop (``lib/concurrency.py``, docs/MONAILABEL_COMPAT.md #6).

The queue on its own first (asyncio, a stand-in request, a tiny torch module), then a real
server with ``--conf infer_queue 1 --conf cache_size 0`` (no embedding cache, so a 3D box
really runs the encoder on every slice) on a private copy of the sample datastore, driven by
several ``MONAILabelClient`` s at once. Assertions are about order, never about timing.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urlparse

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from fastapi import FastAPI, HTTPException
from fastapi.routing import APIRoute
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelUtils
from monailabel.endpoints import infer as upstream

from lib.concurrency import ClientGone, InferQueue, install, queued_infer
from lib.settings import AppConfigError, AppSettings

MODEL = "medsegx"
SPLEEN_VALUE = 2
# 10 slices through the spleen of ct_phantom: 10 encoder passes, seconds even on a fast CPU
SPLEEN_SLAB = [131, 169, 91, 131, 25, 34]
# the whole MNI152 head: ~50 encoder passes, minutes on 2 CPU cores; only ever stopped here
WHOLE_HEAD = [10, 88, 10, 106, 0, 94]


class StandIn:
    """The one thing ``InferQueue`` asks of a Starlette ``Request``."""

    def __init__(self):
        self.disconnected = False

    async def is_disconnected(self) -> bool:
        return self.disconnected


def run_model_until_stopped(limit_s: float = 30.0) -> str:
    """Worker-thread work that calls a torch module until the queue stops it (or ``limit_s``)."""
    layer = torch.nn.Linear(4, 4)
    deadline = time.monotonic() + limit_s
    with torch.inference_mode():
        while time.monotonic() < deadline:
            layer(torch.zeros(1, 4))
            time.sleep(0.01)
    return "not stopped"


# -- the queue on its own ---------------------------------------------------------------
def test_one_runs_at_a_time_and_the_rest_in_arrival_order():
    started, active, peak = [], [0], [0]
    lock = threading.Lock()

    def work(name):
        def run():
            with lock:
                started.append(name)
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            return name
        return run

    async def main():
        queue = InferQueue(max_waiting=4, time_cap_s=30, poll_s=0.01)
        tasks = [asyncio.create_task(queue.run(StandIn(), work(name))) for name in "abcde"]
        results = await asyncio.gather(*tasks)
        return results, queue.status()

    results, status = asyncio.run(main())
    assert results == list("abcde") and started == list("abcde")
    assert peak[0] == 1
    assert status == {"running": 0, "waiting": 0, "max_waiting": 4, "time_cap_s": 30, "served": 5, "refused": 0,
                      "stopped": 0}


def test_a_full_queue_answers_503_with_retry_after_and_a_gone_waiter_leaves_it():
    release = threading.Event()

    async def main():
        queue = InferQueue(max_waiting=1, time_cap_s=30, poll_s=0.01)
        running = asyncio.create_task(queue.run(StandIn(), lambda: release.wait(10) and "first"))
        gone = StandIn()
        waiting = asyncio.create_task(queue.run(gone, lambda: "never runs"))
        while queue.status()["waiting"] < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(HTTPException) as refused:
            await queue.run(StandIn(), lambda: "refused")
        gone.disconnected = True
        with pytest.raises(ClientGone):
            await waiting
        after_leaving = queue.status()
        release.set()
        first = await running
        return refused.value, after_leaving, first, await queue.run(StandIn(), lambda: "next"), queue.status()

    refused, after_leaving, first, following, status = asyncio.run(main())
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert after_leaving["waiting"] == 0 and after_leaving["running"] == 1
    assert (first, following) == ("first", "next")
    assert status["refused"] == 1 and status["served"] == 2 and status["running"] == 0


def test_a_disconnect_stops_the_running_model_and_frees_the_slot():
    async def main():
        queue = InferQueue(max_waiting=1, time_cap_s=30, poll_s=0.01)
        client = StandIn()
        running = asyncio.create_task(queue.run(client, run_model_until_stopped))
        while not queue.status()["running"]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        torch.nn.Linear(4, 4)(torch.zeros(1, 4))  # other threads' modules are not stopped
        client.disconnected = True
        with pytest.raises(ClientGone):
            await running
        return queue.status(), await queue.run(StandIn(), lambda: "next")

    status, following = asyncio.run(main())
    assert status["stopped"] == 1 and status["running"] == 0
    assert following == "next"


def test_a_run_past_the_time_cap_is_stopped_with_504():
    async def main():
        queue = InferQueue(max_waiting=0, time_cap_s=0.2, poll_s=0.01)
        with pytest.raises(HTTPException) as capped:
            await queue.run(StandIn(), run_model_until_stopped)
        return capped.value, queue.status()

    capped, status = asyncio.run(main())
    assert capped.status_code == 504 and "MONAI_LABEL_INFER_TIMEOUT" in capped.detail
    assert status["stopped"] == 1


def test_install_puts_the_queued_route_first_once():
    app = FastAPI()
    app.include_router(upstream.router)
    first, second = InferQueue(1, 30), InferQueue(2, 30)
    install(app, first)
    install(app, second)  # e.g. after POST /reload
    queued = [route for route in app.router.routes if isinstance(route, APIRoute) and route.endpoint is queued_infer]
    assert len(queued) == 1 and app.router.routes[0] is queued[0]
    assert queued[0].path == "/infer/{model}" and queued[0].methods == {"POST"}
    assert app.state.medsegx_infer_queue is second


def test_infer_queue_option(tmp_path):
    assert AppSettings.from_conf({}, tmp_path).infer_queue == 8
    assert AppSettings.from_conf({"infer_queue": "0"}, tmp_path).infer_queue == 0
    with pytest.raises(AppConfigError, match="--conf infer_queue '-2' is not a non-negative integer"):
        AppSettings.from_conf({"infer_queue": "-2"}, tmp_path)


# -- a real server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_server(sample_data, server_launcher, tmp_path_factory):
    """A server of its own: one infer may wait, no embedding cache, a datastore copy it may write to."""
    root = tmp_path_factory.mktemp("concurrency")
    datastore = shutil.copytree(sample_data["datastore"], root / "datastore")
    yield from server_launcher.serve(root, datastore, "--conf", "infer_queue", "1", "--conf", "cache_size", "0")


def queue_status(client: MONAILabelClient) -> dict:
    return client.info()["medsegx"]["inference"]


def wait_for_queue(client: MONAILabelClient, condition, what: str, timeout_s: float = 120.0) -> dict:
    """Poll ``/info`` (which must answer while inference runs) until ``condition(status)``."""
    deadline = time.monotonic() + timeout_s
    status = queue_status(client)
    while not condition(status):
        if time.monotonic() > deadline:
            pytest.fail(f"the infer queue never {what}: {status}")
        time.sleep(0.05)  # poll interval
        status = queue_status(client)
    return status


def in_thread(call) -> tuple[threading.Thread, dict]:
    """Run ``call()`` in a thread; the dict gets ``result`` or ``error``, then ``done_at``."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = call()
        except Exception as err:  # reported by the test that reads the outcome
            outcome["error"] = err
        outcome["done_at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def send_infer_without_reading(url: str, image_id: str, params: dict) -> http.client.HTTPConnection:
    """POST an infer request as MONAILabelClient does, and return without waiting for the answer."""
    content_type, body = MONAILabelUtils.encode_multipart_formdata({"params": json.dumps(params)}, {})
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port)
    connection.request("POST", f"/infer/{MODEL}?{urlencode({'image': image_id, 'output': 'json'})}", body,
                       {"content-type": content_type, "content-length": str(len(body))})
    return connection


@pytest.mark.server
def test_info_datastore_and_label_save_finish_while_a_3d_box_runs(busy_server, sample_data, tmp_path):
    radiologist, annotator = busy_server.client(), busy_server.client()
    box, outcome = in_thread(lambda: radiologist.infer(MODEL, "ct_phantom", {"label": "spleen", "roi": SPLEEN_SLAB}))
    wait_for_queue(annotator, lambda status: status["running"] == 1, "started the 3D box")

    info = annotator.info()
    listing = annotator.datastore()
    image = requests.get(f"{busy_server.url}/datastore/image", params={"image": "ct_phantom"}, timeout=60)
    truth = nib.load(sample_data["ground_truth"]["ct_phantom_unlabelled"])
    saved = annotator.save_label("ct_phantom_unlabelled", sample_data["ground_truth"]["ct_phantom_unlabelled"],
                                 tag="final")
    training = requests.get(f"{busy_server.url}/train/", timeout=60)  # 404 "No Train Tasks Found" until one ran
    second_client_done_at = time.monotonic()
    still_running = queue_status(annotator)["running"]

    box.join(timeout=600)
    assert not box.is_alive(), "the 3D box did not finish within 10 minutes"
    assert "error" not in outcome, outcome.get("error")
    assert still_running == 1 and second_client_done_at < outcome["done_at"], \
        "the second client's calls must finish while the 3D box still runs"
    result_file, _ = outcome["result"]
    assert Path(result_file).is_file()

    assert info["medsegx"]["inference"]["max_waiting"] == 1
    assert "ct_phantom_unlabelled" in listing["objects"]
    assert image.status_code == 200 and len(image.content) > 0
    assert saved["image"] == "ct_phantom_unlabelled"
    assert training.status_code in (200, 404), training.text
    downloaded = annotator.download_label("ct_phantom_unlabelled", "final")
    np.testing.assert_array_equal(np.asarray(nib.load(downloaded).dataobj), np.asarray(truth.dataobj))


@pytest.mark.server
def test_a_full_queue_answers_503_and_a_gone_client_stops_its_3d_box(busy_server, sample_data):
    observer = busy_server.client()
    wait_for_queue(observer, lambda status: status["running"] == 0 and status["waiting"] == 0, "went idle")
    before = queue_status(observer)
    gone = send_infer_without_reading(busy_server.url, "mni152_t1", {"label": "brain", "roi": WHOLE_HEAD})
    wait_for_queue(observer, lambda status: status["running"] == 1, "started the whole-head box")

    spleen = nib.load(sample_data["labels"]["ct_phantom"]).dataobj[..., 30] == SPLEEN_VALUE
    x, y = np.nonzero(spleen)
    slice_box = {"label": "spleen", "roi": [int(x.min()), int(x.max()), int(y.min()), int(y.max()), 30, 30]}
    waiter, outcome = in_thread(lambda: busy_server.client().infer(MODEL, "ct_phantom", slice_box))
    wait_for_queue(observer, lambda status: status["waiting"] == 1, "queued the 2D box")

    refused = requests.post(f"{busy_server.url}/infer/{MODEL}", params={"image": "ct_phantom", "output": "json"},
                            data={"params": json.dumps(slice_box)}, timeout=60)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["detail"]

    gone.close()  # the whole-head client gives up
    waiter.join(timeout=300)
    assert not waiter.is_alive() and "error" not in outcome, outcome.get("error")
    result_file, _ = outcome["result"]
    assert Path(result_file).is_file()  # the model still answers after the stop
    after = wait_for_queue(observer, lambda status: status["running"] == 0, "went idle")
    assert after["stopped"] == before["stopped"] + 1, "the gone client's whole-head box must be stopped, not finished"
    assert after["refused"] == before["refused"] + 1


@pytest.mark.server
def test_request_errors_pass_through_the_queue(busy_server):
    answer = requests.post(f"{busy_server.url}/infer/{MODEL}", params={"image": "ct_phantom"},
                           data={"params": json.dumps({"label": "liver"})}, timeout=60)
    assert answer.status_code == 422 and "a prompt is required" in answer.json()["detail"]
    assert queue_status(busy_server.client())["running"] == 0
