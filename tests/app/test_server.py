"""The app behind a real MONAI Label server, driven by ``MONAILabelClient`` (what 3D Slicer uses).

One server for the module (``medsegx_server`` in ``tests/conftest.py``); tests run in file
order and the checkpoint-reload test comes last because it publishes ``model/medsegx.pth``.
Measured latencies are printed (``pytest -s``) and kept in the result JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsegx.metrics import dice
from slicer_helpers import slicer_error

pytestmark = pytest.mark.server

MODEL = "medsegx"
CT_LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5}
DICE_MIN = 0.85
# 3D case: a box over the middle 9 slices of the left kidney (propagated both ways from the most
# confident of its slices); 9 encoder passes keep the test short on 2 CPU cores. Dice is taken over the box's
# slab, and the mask must be empty outside it.
KIDNEY = "kidney_left"
SLAB_HALF_DEPTH = 4


def bounding_roi(mask_xyz: np.ndarray) -> list[int]:
    """``[i0, i1, j0, j1, k0, k1]`` (Slicer's ROI layout) inclusive voxel indices of a mask in (i, j, k) order."""
    x, y, z = np.nonzero(mask_xyz)
    return [int(x.min()), int(x.max()), int(y.min()), int(y.max()), int(z.min()), int(z.max())]


def http_error(call) -> tuple[int, str]:
    """Run a client call expected to fail; return (status, detail) from the client's exception."""
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as info:
        call()
    return slicer_error(info.value)


@pytest.fixture(scope="module")
def latencies() -> dict[str, dict]:
    """Latencies measured by the tests, printed at the end of the module."""
    measured: dict[str, dict] = {}
    yield measured
    print("\nmeasured latencies (s):")
    for name, values in measured.items():
        print(f"  {name}: {json.dumps(values)}")


def infer(client, image_id: str, params: dict):
    start = time.perf_counter()
    result_file, result = client.infer(MODEL, image_id, params)
    result["client_wall_s"] = round(time.perf_counter() - start, 3)
    return result_file, result


def assert_same_grid(result_file: str, reference: nib.Nifti1Image) -> np.ndarray:
    result = nib.load(result_file)
    assert result.shape == reference.shape
    np.testing.assert_allclose(result.affine, reference.affine, atol=1e-4)
    return np.asarray(result.dataobj)


def test_info_lists_model_and_labels(client):
    info = client.info()
    model = info["models"][MODEL]
    assert model["type"] == "deepgrow" and model["dimension"] == 3
    assert info["models"][f"{MODEL}_labels"]["type"] == "vista3d"
    labels = model["labels"]
    assert list(labels)[: len(CT_LABELS)] == list(CT_LABELS)  # the sample structures come first, values 1..
    assert labels["liver"] == 1 and len(labels) <= 40
    assert len(set(labels.values())) == len(labels), "label values must be unique"
    assert info["models"][f"{MODEL}_labels"]["labels"] == labels  # one label map for both entries
    assert info["medsegx"]["backbone"] == "lite"
    assert info["labels"] == []  # see main.py: keeps Slicer's Next Sample from an error popup


def test_2d_box_on_ct_phantom(client, ct_phantom, latencies):
    image, label = ct_phantom
    liver = label == CT_LABELS["liver"]
    x0, x1, y0, y1, z0, z1 = bounding_roi(liver)
    z = (z0 + z1) // 2
    result_file, result = infer(client, "ct_phantom", {"label": "liver", "roi": [x0, x1, y0, y1, z, z]})

    predicted = assert_same_grid(result_file, image)
    assert result["label_index"] == client.info()["models"][MODEL]["labels"]["liver"]
    assert set(np.unique(predicted)) <= {0, 1}  # deepgrow entry: value 1, what Slicer imports
    assert not predicted[..., :z].any() and not predicted[..., z + 1:].any()
    score = dice(predicted[..., z] == 1, liver[..., z])
    assert score >= DICE_MIN, result

    assert result["mode"] == "2d"
    assert result["modality"] == "CT" and result["modality_source"] == "intensity"
    assert result["taxonomy_path"] == ["CT", "body", "abdomen", "liver", "Liver"]
    assert 0.0 <= result["iou"] <= 1.5
    assert result["model_version"] == "embedded-lite"
    assert result["latencies"]["cache_hit"] is False
    latencies["2d first"] = {"dice": round(score, 3), **result["latencies"]["model"],
                             "server_total": result["latencies"]["total"], "client": result["client_wall_s"]}


def test_2d_second_call_reuses_embedding(client, ct_phantom, latencies):
    image, label = ct_phantom
    liver = label == CT_LABELS["liver"]
    x0, x1, y0, y1, z0, z1 = bounding_roi(liver)
    z = (z0 + z1) // 2 + 1  # a slice no other test encodes: the first call here is a cache miss
    params = {"label": "liver", "roi": [x0, x1, y0, y1, z, z]}
    _, first = infer(client, "ct_phantom", params)
    result_file, second = infer(client, "ct_phantom", params)

    assert first["latencies"]["cache_hit"] is False and first["latencies"]["model"]["encode"] > 0
    assert second["latencies"]["cache_hit"] is True and second["latencies"]["model"]["encode"] == 0.0
    assert second["latencies"]["infer"] < first["latencies"]["infer"]
    assert second["latencies"]["total"] < first["latencies"]["total"]
    predicted = assert_same_grid(result_file, image)
    assert dice(predicted[..., z] > 0, liver[..., z]) >= DICE_MIN
    for name, result in (("2d miss", first), ("2d cached", second)):
        latencies[name] = {**result["latencies"]["model"], "server_total": result["latencies"]["total"],
                           "client": result["client_wall_s"]}


def test_3d_box_on_ct_phantom(client, ct_phantom, latencies):
    image, label = ct_phantom
    kidney = label == CT_LABELS[KIDNEY]
    x0, x1, y0, y1, z0, z1 = bounding_roi(kidney)
    middle = (z0 + z1) // 2
    roi = [x0, x1, y0, y1, middle - SLAB_HALF_DEPTH, middle + SLAB_HALF_DEPTH]
    slab = slice(roi[4], roi[5] + 1)
    result_file, result = infer(client, "ct_phantom", {"label": KIDNEY, "roi": roi})

    predicted = assert_same_grid(result_file, image)
    score = dice(predicted[..., slab] > 0, kidney[..., slab])
    assert score >= DICE_MIN, result
    assert not predicted[..., : roi[4]].any() and not predicted[..., roi[5] + 1 :].any()
    assert result["mode"] == "3d"
    assert result["taxonomy_path"][-1] == "LeftKidney"
    assert result["slices"] == [roi[4], roi[5]]
    latencies["3d first"] = {"dice": round(score, 3), **result["latencies"]["model"],
                             "server_total": result["latencies"]["total"], "client": result["client_wall_s"]}

    result_file, again = infer(client, "ct_phantom", {"label": KIDNEY, "roi": roi})
    assert again["latencies"]["cache_hit"] is True
    assert again["latencies"]["total"] < result["latencies"]["total"]
    assert dice(assert_same_grid(result_file, image)[..., slab] > 0, kidney[..., slab]) == pytest.approx(score)
    latencies["3d cached"] = {**again["latencies"]["model"], "server_total": again["latencies"]["total"],
                              "client": again["client_wall_s"]}


def test_dicom_series_reads_modality_from_the_header(server, client, sample_data):
    """A DICOM series uploaded as a session (``PUT /session/`` with every file, as the stock client's
    ``MONAILabelUtils.http_upload`` sends them): the server keeps it as one series folder."""
    from monailabel.client.client import MONAILabelUtils

    series = sorted(str(path) for path in Path(sample_data["dicom_series"]["ct_phantom_2"]).glob("*.dcm"))
    status, body, _ = MONAILabelUtils.http_upload("PUT", server.url, "/session/", {}, series)
    assert status == 200, body
    session_id = json.loads(body)["session_id"]
    truth = nib.load(sample_data["ground_truth"]["ct_phantom_2"])
    liver = np.asarray(truth.dataobj) == CT_LABELS["liver"]
    x0, x1, y0, y1, z0, z1 = bounding_roi(liver)
    z = (z0 + z1) // 2
    result_file, result = client.infer(MODEL, "", {"label": "liver", "roi": [x0, x1, y0, y1], "slice": z},
                                       session_id=session_id)
    client.remove_session(session_id)

    assert result_file.endswith(".nii.gz")
    assert result["modality"] == "CT" and result["modality_source"] == "dicom"
    predicted = assert_same_grid(result_file, truth)  # the series' grid = its ground truth's
    assert dice(predicted[..., z] > 0, liver[..., z]) >= DICE_MIN


def test_png_picture(client, sample_data):
    truth = np.asarray(Image.open(sample_data["labels"]["ct_slice_2d"]))  # (rows, cols)
    liver_xy = (truth == CT_LABELS["liver"]).T  # LoadImage's (x, y) order
    x, y = np.nonzero(liver_xy)
    roi = [int(x.min()), int(x.max()), int(y.min()), int(y.max())]
    result_file, result = infer(client, "ct_slice_2d", {"label": "liver", "roi": roi, "modality": "CT"})

    assert result_file.endswith(".png")
    predicted = np.asarray(Image.open(result_file))
    assert predicted.shape == truth.shape
    assert result["modality_source"] == "params"
    assert dice(predicted > 0, truth == CT_LABELS["liver"]) >= DICE_MIN


def test_uploaded_jpeg_picture(client, sample_data, tmp_path):
    """An image sent with the request (``file``), not from the datastore; JPEG in, PNG label out."""
    jpeg = tmp_path / "ct_slice.jpg"
    Image.open(sample_data["images"]["ct_slice_2d"]).convert("RGB").save(jpeg, quality=95)
    truth = np.asarray(Image.open(sample_data["labels"]["ct_slice_2d"])) == CT_LABELS["liver"]
    x, y = np.nonzero(truth.T)
    params = {"label": "liver", "roi": [int(x.min()), int(x.max()), int(y.min()), int(y.max())], "modality": "CT"}
    result_file, result = client.infer(MODEL, "", params, file=str(jpeg))

    assert result_file.endswith(".png")
    predicted = np.asarray(Image.open(result_file))
    assert predicted.shape == truth.shape
    assert dice(predicted > 0, truth) >= DICE_MIN


def test_new_label_name_is_appended(client, ct_phantom):
    image, label = ct_phantom
    x0, x1, y0, y1, z0, z1 = bounding_roi(label == CT_LABELS["aorta"])
    before = client.info()["models"][MODEL]["labels"]
    name = "abdominal aorta segment"
    _, result = infer(client, "ct_phantom", {"label": name, "roi": [x0, x1, y0, y1, 20, 20]})

    assert result["label_added"] is True
    assert result["label_index"] == max(before.values()) + 1
    assert client.info()["models"][MODEL]["labels"][name] == result["label_index"]


@pytest.mark.parametrize(
    ("image_id", "params", "status", "message"),
    [
        ("ct_phantom", {"label": "liver", "roi": [500, 500, 600, 600, 10, 10]}, 422, "outside the image"),
        ("ct_phantom", {"label": "liver", "roi": [10, 50, 10, 50, 100, 120]}, 422, "outside the image along k"),
        ("no_such_image", {"label": "liver", "roi": [10, 50, 10, 50, 5, 5]}, 404, "not in the datastore"),
        ("ct_phantom", {"label": "liver", "roi": [10, 10, 50]}, 422, "roi must have 6"),
        ("ct_phantom", {"label": "liver", "roi": "ten by ten"}, 422, "roi must be a list of numbers"),
        ("ct_phantom", {"label": "liver", "roi": [10, 50, 10, 50]}, 422, "needs `slice`"),
        ("ct_phantom", {"label": "liver", "background": [[10, 10, 5]]}, 422, "background clicks alone"),
        ("ct_phantom", {"label": "liver"}, 422, "a prompt is required"),
        ("ct_phantom", {"label_prompt": [999], "foreground": [[40, 90, 20]]}, 422, "label_prompt"),
        ("ct_phantom", {"label": "liver", "roi": [10, 50, 10, 50, 5, 5], "modality": "XYZ"}, 422, "modality"),
        ("ct_phantom", {"label": "liver", "roi": [10, 50, 10, 50, 5, 5], "foreground": [[400, 10, 5]]}, 422,
         "outside the image"),
    ],
    ids=["box-outside-xy", "box-outside-z", "unknown-image", "short-roi", "text-roi", "4-roi-on-volume",
         "background-only", "no-prompt", "unknown-label-prompt", "unknown-modality", "click-outside"],
)
def test_bad_request_is_4xx_and_server_keeps_serving(server, client, image_id, params, status, message):
    got_status, detail = http_error(lambda: client.infer(MODEL, image_id, params))
    assert got_status == status, detail
    assert message.lower() in detail.lower()
    assert server.alive()
    assert MODEL in client.info()["models"]


def test_published_checkpoint_is_loaded_without_restart(server, client, ct_phantom):
    """A train task publishes model/medsegx.pth atomically; the next request uses it."""
    from medsegx.build import build_model
    from medsegx.checkpoint import save_checkpoint

    image, label = ct_phantom
    x0, x1, y0, y1, z0, z1 = bounding_roi(label == CT_LABELS["liver"])
    z = (z0 + z1) // 2
    published = server.app_dir / "model" / "medsegx.pth"
    save_checkpoint(build_model("lite"), published, metadata={"model_version": "test-published-1"})
    _, result = infer(client, "ct_phantom", {"label": "liver", "roi": [x0, x1, y0, y1, z, z]})

    assert result["model_version"] == "test-published-1"
    assert result["model_checkpoint"] == str(published)
    assert result["latencies"]["cache_hit"] is False  # embeddings depend on the weights


def test_missing_checkpoint_fails_at_start(sample_data, server_launcher, tmp_path):
    app_dir = server_launcher.copy_app(tmp_path / "app")
    missing = tmp_path / "nowhere" / "medsegx.pth"
    command = server_launcher.command(app_dir, sample_data["datastore"], "--conf", "medsegx_checkpoint", str(missing))
    completed = subprocess.run(command, env=server_launcher.env(), cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)

    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    errors = [line for line in output.splitlines() if "[ERROR]" in line or "Error" in line]
    assert any(f"--conf medsegx_checkpoint: file not found: {missing}" in line for line in errors), output[-3000:]
    assert "Traceback" not in output, "the start-up error should be one line, not a traceback"
