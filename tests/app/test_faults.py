"""Faults through a real server: ``kill -9`` mid-save and mid-training, a full disk while publishing.

Each test starts its own ``monailabel start_server`` subprocess (eager runtime: no OpenVINO
export on two shared cores) on a private copy of the sample studies, kills what the issue
names with SIGKILL, and checks what a restarted server serves:

- the server killed while a label upload streams in, and while a label is being copied into the
  labels folder: every label saved before is byte-identical, a half-written upload or copy is
  neither listed nor left on disk (``lib/durable.py``, ``docs/MONAILABEL_COMPAT.md`` #9);
- the training subprocess killed mid-epoch and while it publishes: ``model/medsegx.pth`` is the
  previous checkpoint or the complete new one (it loads), a partial temporary file is removed at
  the next start, and infer names the version the file holds;
- the model folder on a full tmpfs (a mount namespace of ``unshare -rm``): the publish fails
  with "No space left on device", the previous model keeps serving, no partial file stays;
- two clients saving labels for one image at once: every download is one whole save;
- infers while a checkpoint is published: each names the version that made its mask.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
import torch

from medsegx.build import build_model
from medsegx.checkpoint import load_checkpoint, publish_checkpoint, save_checkpoint

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "medsegx"
IMAGE = "ct_phantom"
LIVER_ROI = [40, 120, 60, 150, 20, 20]
TINY_RUN = {"images": [IMAGE], "max_epochs": 1, "slices_per_structure": 1, "val_slices_per_structure": 1,
            "publish": "always", "tracking": "None"}
TASK_DEADLINE_S = 900.0
START_TIMEOUT_S = 300.0
GOOD_VERSION = "v-good"
#: A label big enough that copying and flushing it takes long enough to be seen mid-way (.nii: not compressed).
BIG_LABEL_SHAPE = (512, 512, 192)


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the server's whole process group (server, training subprocess), as ``kill -9`` would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def root_path(self, path: Path) -> Path:
        """``path`` as the server sees it (inside its mount namespace, if it has one)."""
        return Path(f"/proc/{self.process.pid}/root{path}")

    def trainer(self) -> psutil.Process | None:
        """MONAI Label's background train process (``python -m monailabel.interfaces.utils.app -m train``)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "monailabel.interfaces.utils.app -m train " in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def infer(self) -> dict:
        response = requests.post(f"{self.url}/infer/{MODEL}", params={"image": IMAGE, "output": "json"},
                                 data={"params": json.dumps({"label": "liver", "roi": LIVER_ROI})}, timeout=600)
        assert response.status_code == 200, response.text
        return response.json()

    def train(self, params: dict) -> None:
        response = requests.post(f"{self.url}/train/{MODEL}", json=params, timeout=60)
        assert response.status_code == 200, response.text

    def train_task(self) -> dict:
        response = requests.get(f"{self.url}/train/", timeout=30)
        return response.json() if response.status_code == 200 else {}


class Site:
    """One app copy + studies copy; servers started on it in turn (a restart keeps both)."""

    def __init__(self, root: Path, sample_data: dict, launcher):
        self.root = root
        self.launcher = launcher
        self.app_dir = launcher.copy_app(root / "app")
        self.studies = root / "studies"
        shutil.copytree(sample_data["datastore"], self.studies)
        self.model_dir = self.app_dir / "model"
        self.model_dir.mkdir(exist_ok=True)
        self.starts = 0

    @property
    def published(self) -> Path:
        return self.model_dir / "medsegx.pth"

    @property
    def final_labels(self) -> Path:
        return self.studies / "labels" / "final"

    def start(self, wrapper: list[str] | None = None) -> RunningServer:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        command = self.launcher.command(self.app_dir, self.studies, "--conf", "tracking", "none")
        port = command[command.index("--port") + 1]
        # eager: no OpenVINO export; no scoring subprocess competing with the trainer for two cores
        env = {**self.launcher.env(), "MEDSEGX_RUNTIME": "eager", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
        with open(log, "wb") as log_file:
            process = subprocess.Popen([*(wrapper or []), *command], stdout=log_file, stderr=subprocess.STDOUT,
                                       env=env, cwd=self.root, start_new_session=True)
        server = RunningServer(f"http://127.0.0.1:{port}", process, log)
        try:
            self.launcher.wait_until_serving(server.url, process, log, START_TIMEOUT_S)
        except BaseException:
            server.kill()
            raise
        return server


@pytest.fixture
def site(tmp_path, sample_data, server_launcher):
    return Site(tmp_path, sample_data, server_launcher)


@pytest.fixture
def running(site):
    """Started servers, stopped at the end of the test whatever happened."""
    servers: list[RunningServer] = []

    def start(wrapper: list[str] | None = None) -> RunningServer:
        servers.append(site.start(wrapper))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def write_good_checkpoint(path: Path) -> bytes:
    save_checkpoint(build_model("lite"), path, metadata={"model_version": GOOD_VERSION})
    return path.read_bytes()


def checkpoint_version(path: Path) -> str:
    """The ``model_version`` of a checkpoint file; raises if the file is not a whole checkpoint."""
    return load_checkpoint(build_model("lite"), path)["model_version"]


def wait_for_train(server: RunningServer) -> dict:
    deadline = time.monotonic() + TASK_DEADLINE_S
    while time.monotonic() < deadline:
        task = server.train_task()
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(1)  # poll interval
    pytest.fail(f"train task still running after {TASK_DEADLINE_S:.0f} s:\n{server.log_tail()}")


def wait_for_log(server: RunningServer, text: str) -> None:
    """Poll the train task's details until ``text`` appears (the task must still be running)."""
    deadline = time.monotonic() + TASK_DEADLINE_S
    while time.monotonic() < deadline:
        task = server.train_task()
        if text in "\n".join(task.get("details", [])):
            return
        assert task.get("status") in ("SUBMITTED", "RUNNING", None), f"train ended before {text!r}: {task}"
        time.sleep(0.5)  # poll interval
    pytest.fail(f"{text!r} not in the train log after {TASK_DEADLINE_S:.0f} s")


# --------------------------------------------------------------------------- labels


def label_file(folder: Path, name: str, fill: int, shape=(64, 64, 24)) -> Path:
    """An uncompressed NIfTI label whose voxels all hold ``fill`` (so a file tells which save it was)."""
    path = folder / f"{name}.nii"
    nib.save(nib.Nifti1Image(np.full(shape, fill, np.uint8), np.eye(4)), path)
    return path


def save_label(url: str, path: Path, image: str = IMAGE) -> requests.Response:
    with open(path, "rb") as stream:
        return requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                            files={"label": (path.name, stream)}, data={"params": "{}"}, timeout=600)


def listed_label(url: str, image: str = IMAGE) -> dict:
    return requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"][image]["labels"]


def partials(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith((".partial", ".tmp"))]


def test_kill_during_label_upload_and_copy_keeps_every_saved_label(site, running, tmp_path):
    server = running()
    saved = label_file(tmp_path, "saved", 1)
    assert save_label(server.url, saved).status_code == 200
    on_disk = site.final_labels / f"{IMAGE}.nii"
    assert on_disk.read_bytes() == saved.read_bytes()

    # 1. killed while the upload of a newer label streams in: half of its body sent
    newer = label_file(tmp_path, "newer", 2, BIG_LABEL_SHAPE)
    body = newer.read_bytes()
    boundary = "faultboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"{newer.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    killed = threading.Event()

    def halves():
        yield head + body[: len(body) // 2]
        server.kill()
        killed.set()
        yield body[len(body) // 2:] + f"\r\n--{boundary}--\r\n".encode()

    with pytest.raises(requests.ConnectionError):
        requests.put(f"{server.url}/datastore/label", params={"image": IMAGE, "tag": "final"}, data=halves(),
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=600)
    assert killed.is_set()
    server = running()
    assert on_disk.read_bytes() == saved.read_bytes()
    assert listed_label(server.url)["final"]["ext"] == ".nii"
    assert partials(site.final_labels) == []

    # 2. killed while the server copies a complete upload into the labels folder
    seen_partial = False
    expected = {saved.read_bytes(): "saved", body: "newer"}
    saver = threading.Thread(target=lambda: _ignore_connection_errors(save_label, server.url, newer))
    saver.start()
    while saver.is_alive() and server.process.poll() is None:
        if partials(site.final_labels):
            seen_partial = True
            server.kill()
            break
    saver.join(timeout=600)
    if server.process.poll() is None:  # the save finished before a partial file was seen: kill after it
        server.kill()
    running()
    assert partials(site.final_labels) == [], "a partial label stayed in the labels folder"
    assert on_disk.read_bytes() in expected, "the label on disk is neither the saved one nor the complete new one"
    assert seen_partial, "the kill never landed while the label was being copied (the copy was too quick to see)"


def _ignore_connection_errors(function, *args):
    try:
        function(*args)
    except requests.ConnectionError:
        pass  # the server was killed under the request: what the test does


def test_concurrent_saves_for_one_image_each_land_whole(site, running, tmp_path):
    server = running()
    versions = {fill: label_file(tmp_path, f"client{fill}", fill, (128, 128, 64)) for fill in (3, 4)}
    contents = {path.read_bytes(): fill for fill, path in versions.items()}
    answers: list[int] = []
    downloads: list[bytes] = []

    def client(fill: int) -> None:
        for _ in range(6):
            answers.append(save_label(server.url, versions[fill]).status_code)
            downloads.append(requests.get(f"{server.url}/datastore/label",
                                          params={"label": IMAGE, "tag": "final"}, timeout=60).content)

    clients = [threading.Thread(target=client, args=(fill,)) for fill in versions]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=600)
    assert answers == [200] * 12
    assert all(download in contents for download in downloads), "a downloaded label mixes two saves"
    assert (site.final_labels / f"{IMAGE}.nii").read_bytes() in contents
    assert partials(site.final_labels) == []


# --------------------------------------------------------------------------- training and publishing


def test_kill_of_the_trainer_mid_epoch_keeps_the_served_model(site, running):
    good = write_good_checkpoint(site.published)
    server = running()
    assert server.infer()["model_version"] == GOOD_VERSION
    server.train({**TINY_RUN, "max_epochs": 50})
    wait_for_log(server, "medsegx train: starting from")
    trainer = server.trainer()
    assert trainer is not None, "no train subprocess found"
    trainer.send_signal(signal.SIGKILL)
    task = wait_for_train(server)
    assert task["status"] == "ERROR", task
    assert site.published.read_bytes() == good
    assert server.infer()["model_version"] == GOOD_VERSION
    server.kill()
    server = running()
    assert server.infer()["model_version"] == GOOD_VERSION
    assert partials(site.model_dir) == []


def test_kill_of_the_trainer_while_it_publishes_leaves_a_whole_checkpoint(site, running):
    write_good_checkpoint(site.published)
    server = running()
    caught = None
    for attempt in range(3):
        server.train(TINY_RUN)
        trainer = None
        while trainer is None and server.train_task().get("status") in ("SUBMITTED", "RUNNING", None):
            trainer = server.trainer()
        while trainer is not None and trainer.is_running():  # tight poll: a publish lasts a few hundred ms
            found = partials(site.model_dir)
            if found:
                trainer.send_signal(signal.SIGKILL)
                caught = found
                break
        task = wait_for_train(server)
        if caught:
            assert task["status"] == "ERROR", task
            break
    assert caught, "three training runs published before their temporary file was seen"
    version = checkpoint_version(site.published)  # loads: the file is whole
    assert server.infer()["model_version"] == version
    server.kill()
    assert partials(site.model_dir), "the killed publish should have left its temporary file"
    server = running()
    assert partials(site.model_dir) == [], "the restarted server did not remove the partial checkpoint"
    assert server.infer()["model_version"] == version


def test_full_disk_while_publishing_keeps_the_previous_model(site, running, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed: no private tmpfs for the model folder")
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no user + mount namespace here: {probe.stderr.strip()}")
    seed = tmp_path / "good.pth"
    good = write_good_checkpoint(seed)
    checkpoint_mb = len(good) / 2**20
    # the model folder: a 64 MiB tmpfs holding the good checkpoint and a filler that leaves room for the
    # kept previous copy (1 checkpoint) but not for the new one as well
    filler_mb = int(64 - checkpoint_mb * 2.5)
    script = ('set -e; mount -t tmpfs -o size=64m tmpfs "$0"; cp "$1" "$0/medsegx.pth"; '
              'head -c "$2"M /dev/zero > "$0/filler"; shift 3; exec "$@"')
    server = running(["unshare", "-rm", "bash", "-c", script, str(site.model_dir), str(seed), str(filler_mb), "--"])
    published = server.root_path(site.published)
    assert published.read_bytes() == good
    assert server.infer()["model_version"] == GOOD_VERSION
    server.train(TINY_RUN)
    task = wait_for_train(server)
    details = "\n".join(task.get("details", []))
    assert "No space left on device" in details, details[-3000:]
    assert published.read_bytes() == good
    assert partials(server.root_path(site.model_dir)) == []
    assert server.infer()["model_version"] == GOOD_VERSION


# --------------------------------------------------------------------------- hot swap


def perturbed_checkpoint(path: Path, version: str) -> None:
    """Publish (as the train task does) weights whose masks differ from the good checkpoint's."""
    model = build_model("lite")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, tensor in model.trainable_state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * (tensor.std() + 1e-3) * 0.5)
    publish_checkpoint(model, path, {"model_version": version})


def test_infers_during_a_hot_swap_name_the_version_whose_mask_they_carry(site, running, tmp_path):
    write_good_checkpoint(site.published)
    server = running()
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    request = {"label": "liver", "roi": LIVER_ROI}

    def infer() -> tuple[str, np.ndarray]:
        result_file, params = client.infer(MODEL, IMAGE, request)
        return params["model_version"], np.asarray(nib.load(result_file).dataobj)

    answers = [infer()]
    publisher = threading.Thread(target=perturbed_checkpoint, args=(site.published, "v-new"))
    publisher.start()
    while publisher.is_alive() or len(answers) < 4:
        answers.append(infer())
        assert len(answers) < 200, "the publish never ended"
    publisher.join()
    answers.append(infer())

    masks = {version: mask for version, mask in answers}  # the last answer of each version
    assert set(masks) == {GOOD_VERSION, "v-new"}, [version for version, _ in answers]
    assert not np.array_equal(masks[GOOD_VERSION], masks["v-new"]), "the two versions should segment differently"
    for version, mask in answers:
        assert np.array_equal(mask, masks[version]), f"an answer named {version} carries another version's mask"
