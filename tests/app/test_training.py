"""In-loop fine-tuning through a real MONAI Label server, driven by ``MONAILabelClient``.

Runs on the session server (``medsegx_server``, after ``test_server.py``). The module adds its
own images to the datastore so the sample images keep their labels:

- ``ft_ct``: a CT phantom labelled here with ``PUT /datastore/label`` (liver and spleen of its
  ground truth, names sent as MONAI Label's ``label_info``);
- ``ft_corrupt`` (label file that is not a NIfTI) and ``ft_empty`` (an all-background label):
  the train task must skip both with a warning;
- ``al_brain``: one more unlabelled image, so the uncertainty strategy has a choice.

Training is kept tiny for two CPU cores (1 epoch, 1 slice per structure).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from medsegx.build import build_model
from medsegx.checkpoint import load_checkpoint
from medsegx.runtime import adapters_inert, default_cache_dir, ir_folder, ir_paths, runtime_available, weights_digest
from medsegx.taxonomy import resolve

from lib.interactive import BUSY, IDLE, marker_path

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "medsegx"
TRAIN_IMAGE, CORRUPT, EMPTY, UNLABELLED_BRAIN = "ft_ct", "ft_corrupt", "ft_empty", "al_brain"
TRAINED = {"liver": 1, "spleen": 2}
SCORING = "medsegx_uncertainty"
TASK_DEADLINE_S = 900.0
TINY_RUN = {"max_epochs": 1, "slices_per_structure": 1, "val_slices_per_structure": 1}


@pytest.fixture(scope="module")
def published(server) -> Path:
    return server.app_dir / "model" / "medsegx.pth"


@pytest.fixture(scope="module")
def datastore_images(client, sample_data, tmp_path_factory) -> dict[str, str]:
    """Upload the module's images and labels (``PUT /datastore`` and ``PUT /datastore/label``)."""
    folder = tmp_path_factory.mktemp("training-data")
    ct_image = sample_data["images"]["ct_phantom_unlabelled"]
    truth = nib.load(sample_data["ground_truth"]["ct_phantom_unlabelled"])
    values = np.asarray(truth.dataobj)
    label = np.where(np.isin(values, list(TRAINED.values())), values, 0).astype(np.uint8)
    label_file = folder / "ft_ct_label.nii.gz"
    nib.save(nib.Nifti1Image(label, truth.affine), label_file)

    brain = sample_data["images"]["mni152_t1"]
    brain_label = nib.load(sample_data["labels"]["mni152_t1"])
    empty_file = folder / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(brain_label.shape, np.uint8), brain_label.affine), empty_file)
    corrupt_file = folder / "corrupt.nii.gz"
    corrupt_file.write_bytes(b"this is not a NIfTI file\n" * 40)

    for image_id, path in ((TRAIN_IMAGE, ct_image), (CORRUPT, brain), (EMPTY, brain), (UNLABELLED_BRAIN, brain)):
        assert client.upload_image(str(path), image_id=image_id)["image"] == image_id
    label_info = [{"name": name, "idx": value} for name, value in TRAINED.items()]
    client.save_label(TRAIN_IMAGE, str(label_file), tag="final", params={"label_info": label_info})
    client.save_label(CORRUPT, str(corrupt_file), tag="final", params={})
    client.save_label(EMPTY, str(empty_file), tag="final", params={})
    return {"ct_image": ct_image, "truth": sample_data["ground_truth"]["ct_phantom_unlabelled"]}


def liver_request(truth_path: str) -> dict:
    liver = np.asarray(nib.load(truth_path).dataobj) == TRAINED["liver"]
    x, y, z = np.nonzero(liver)
    middle = int(np.median(z))
    return {"label": "liver", "roi": [int(x.min()), int(x.max()), int(y.min()), int(y.max()), middle, middle]}


def wait_for_task(url: str, what: str, deadline_s: float = TASK_DEADLINE_S) -> dict:
    """Poll ``GET /<what>/`` until the last task is no longer running; return it ({} if none ran)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/{what}/", timeout=30)
        if response.status_code == 404:  # MONAI Label: "No ... Tasks Found"
            return {}
        if response.status_code == 200 and response.json().get("status") not in ("SUBMITTED", "RUNNING"):
            return response.json()
        time.sleep(2)  # poll interval
    pytest.fail(f"{what} task still running after {deadline_s:.0f} s")


def run_training(server, client, params: dict) -> dict:
    wait_for_task(server.url, "train")  # a previous run (if any) must be over
    started = client.train_start(MODEL, params)
    assert started.get("status") in ("SUBMITTED", "RUNNING"), started
    return started


def test_train_publishes_a_checkpoint_that_infer_uses(server, client, datastore_images, published):
    request = liver_request(datastore_images["truth"])
    _, before = client.infer(MODEL, TRAIN_IMAGE, request)
    served_before = before["model_version"]
    had_checkpoint = published.is_file()

    run_training(server, client, {**TINY_RUN, "images": [TRAIN_IMAGE, CORRUPT, EMPTY], "publish": "always",
                                  "tracking": "mlflow"})
    assert client.train_status()["status"] in ("SUBMITTED", "RUNNING")
    # inference keeps answering while the background process trains (cached embedding: decoder only)
    _, during = client.infer(MODEL, TRAIN_IMAGE, request)
    assert during["model_version"] == served_before

    task = wait_for_task(server.url, "train")
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", details
    assert "medsegx train: epoch 1/1 loss" in details and "val Dice" in details
    assert "published model" in details
    assert "yielded" in details  # time spent waiting for infer requests (lib/interactive.py)

    stats = client.info()["train_stats"][MODEL]
    result = stats["medsegx"]
    assert result["published"] is True, result
    assert result["parent_model_version"] == served_before
    assert result["yielded_s"] >= 0 and result["yield_capped"] == 0
    assert result["training_set"]["volumes"] == [TRAIN_IMAGE]
    assert sorted(result["training_set"]["structures"]) == [f"{TRAIN_IMAGE}:liver", f"{TRAIN_IMAGE}:spleen"]
    skipped = "\n".join(result["training_set"]["skipped"])
    assert f"{CORRUPT}: cannot read label" in skipped and f"{EMPTY}: the label is empty" in skipped
    assert "val_mean_dice" in stats["eval"]["metrics"] and "train_mean_dice" in stats["train"]["metrics"]
    log = server.log_tail(4000)
    assert f"skipping {CORRUPT}: cannot read label" in log and f"skipping {EMPTY}: the label is empty" in log

    # the checkpoint: official layout with metadata, loadable, the previous one kept
    tuned = build_model("lite")
    metadata = load_checkpoint(tuned, published)
    assert metadata["model_version"] == result["model_version"] != served_before
    # what the decoder learnt serves the labelled structures only (issue 14's regression guard)
    assert tuned.tuned_context_set() == {tuple(resolve(name, "CT").indices) for name in ("liver", "spleen")}
    assert adapters_inert(tuned)  # train_adapters is off by default: the encoder is the served one
    assert metadata["parent_model_version"] == served_before
    assert metadata["training_set"]["structures"] == result["training_set"]["structures"]
    assert (published.parent / "medsegx.prev.pth").is_file() == had_checkpoint
    if runtime_available() is None:  # the round converted the published weights' graphs for the server
        folder = ir_folder(default_cache_dir(), weights_digest(tuned))  # the server's own cache key
        assert all(path.is_file() for path in ir_paths(folder, tuned=True)), sorted(folder.parent.glob("*"))
        assert result["graphs_converted_s"] > 0  # before publishing: the server cannot have converted them
    assert not list(published.parent.glob(".*.tmp"))

    # the next request runs on it, without a restart
    _, after = client.infer(MODEL, TRAIN_IMAGE, request)
    assert after["model_version"] == result["model_version"]
    assert after["latencies"]["cache_hit"] is False

    # MLflow (SQLite store next to the model) recorded the run's loss and Dice (MONAI's MLFlowHandler names)
    with sqlite3.connect(published.parent / "mlflow.db") as db:
        keys = {row[0] for row in db.execute("select distinct key from metrics")}
    assert {"Loss", "train_mean_dice", "val_mean_dice"} <= keys, keys


def test_uncertainty_strategy_picks_the_least_sure_unlabelled_image(server, client, datastore_images):
    version = client.info()["train_stats"][MODEL]["medsegx"]["model_version"]
    # MONAI Label rescored in the background after training; ask once more and wait for it
    deadline = time.monotonic() + TASK_DEADLINE_S
    while True:
        wait_for_task(server.url, "scoring")
        response = requests.post(f"{server.url}/scoring/{SCORING}", json={}, timeout=30)
        if response.status_code == 200:
            break
        assert response.status_code == 429 and time.monotonic() < deadline, response.text
    assert wait_for_task(server.url, "scoring")["status"] == "DONE"

    datastore = client.datastore()
    unlabelled = sorted(image for image, entry in datastore["objects"].items() if "final" not in entry["labels"])
    assert UNLABELLED_BRAIN in unlabelled and TRAIN_IMAGE not in unlabelled
    scores = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the server reloads the datastore file the scoring process wrote
        infos = {image: requests.get(f"{server.url}/datastore/image/info", params={"image": image}, timeout=30).json()
                 for image in unlabelled}
        scores = {image: info.get(SCORING) for image, info in infos.items() if info.get(f"{SCORING}_model") == version}
        if len(scores) == len(unlabelled):
            break
        time.sleep(1)  # poll interval
    assert len(scores) == len(unlabelled), infos
    assert all(0.0 <= score <= np.log(2) for score in scores.values())

    chosen = client.next_sample("uncertainty", {})
    assert chosen["id"] in unlabelled
    assert chosen["score"] == pytest.approx(max(scores.values()))
    assert chosen["score_model_version"] == version


def test_failed_training_leaves_the_served_model(server, client, datastore_images, published):
    served = published.read_bytes()
    run_training(server, client, {**TINY_RUN, "images": [CORRUPT, EMPTY]})
    task = wait_for_task(server.url, "train")
    assert task["status"] == "ERROR"
    assert "no usable training slice" in "\n".join(task.get("details", []))
    assert published.read_bytes() == served


def test_the_budget_sets_the_epochs_and_a_plateau_stops_the_round(server, client, datastore_images, published):
    """No max_epochs: the budget plans the round; with lr 0 no epoch validates better, so it stops early
    (from the first epoch past ``base_steps``). ``holdout_min_slices`` 1: every structure holds slices
    out (a round that validates on its training slices only never stops early)."""
    run_training(server, client, {"images": [TRAIN_IMAGE], "lr": 0.0, "weight_decay": 0.0, "base_steps": 2,
                                  "steps_per_slice": 8, "max_steps": 8, "min_epoch_steps": 1, "slices_per_structure": 1,
                                  "holdout_min_slices": 1,
                                  "val_slices_per_structure": 1, "early_stop_patience": 1, "tracking": "None"})
    task = wait_for_task(server.url, "train")
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    log = server.log_tail(4000)  # the task's details keep only its last lines
    # liver and spleen, one slice each per epoch: 8 steps = 4 epochs of 2
    assert "-> 8 steps: 4 epoch(s) of 2, early stop from epoch 1 after 1 epoch(s)" in log
    assert "medsegx train: early stop after 1 epoch(s) without a better validation Dice" in log
    result = client.info()["train_stats"][MODEL]["medsegx"]
    assert result["budget"]["epochs"] == 4 and result["budget"]["steps"] == 8
    assert (result["epochs"], result["best_epoch"]) == (2, 1)


def test_stopped_training_leaves_the_served_model(server, client, datastore_images, published):
    served = published.read_bytes()
    _, before = client.infer(MODEL, TRAIN_IMAGE, liver_request(datastore_images["truth"]))
    run_training(server, client, {**TINY_RUN, "images": [TRAIN_IMAGE], "max_epochs": 5, "publish": "always",
                                  "tracking": "None"})
    deadline = time.monotonic() + TASK_DEADLINE_S
    while "medsegx train: starting from" not in json.dumps(client.train_status()):
        # MONAI Label reports SUBMITTED until its task thread picks the request up
        assert time.monotonic() < deadline and client.train_status()["status"] in ("SUBMITTED", "RUNNING")
        time.sleep(1)  # poll interval
    stopped = client.train_stop()
    assert stopped["status"] == "STOPPED"
    assert published.read_bytes() == served
    assert not list(published.parent.glob(".*.tmp"))
    _, result = client.infer(MODEL, TRAIN_IMAGE, liver_request(datastore_images["truth"]))
    # the version served before the stopped run (the last train stats may be of a round that published nothing)
    assert result["model_version"] == before["model_version"]


def test_the_round_waits_while_the_server_marks_a_request_running(server, client, datastore_images):
    """The marker ``InferQueue`` writes while a request runs (``lib/interactive.py``): the round waits for it,
    at most ``yield_cap_s`` at a time, and reports the time it waited."""
    marker = marker_path(server.app_dir / "model")
    marker.write_text(f"{BUSY} {time.time():.3f}\n")  # a request that runs through the whole round (a 3D box, say)
    try:
        run_training(server, client, {**TINY_RUN, "images": [TRAIN_IMAGE], "lr": 0.0, "weight_decay": 0.0,
                                      "tracking": "None", "yield_cap_s": 1.0})
        task = wait_for_task(server.url, "train")
    finally:
        marker.write_text(f"{IDLE} {time.time():.3f}\n")
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    result = client.info()["train_stats"][MODEL]["medsegx"]
    assert result["yield_capped"] >= 1 and result["yielded_s"] >= 1.0, result
    assert "the server has had interactive work for" in server.log_tail(4000)
