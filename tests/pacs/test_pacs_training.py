"""In-loop fine-tuning from PACS labels: the train task on the DICOMweb datastore.

The CT and the MR series get final labels with ``PUT /datastore/label`` (stored in Orthanc as
DICOM-SEG); ``POST /train/medsegx`` then runs in MONAI Label's background process, which
opens the datastore itself and reads the labels back from the PACS (``lib/dicomweb.py``). The
run is tiny for two CPU cores (1 epoch, 1 slice per structure) and must finish and publish.
Runs after the other PACS modules (it changes the served model).
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import requests

pytestmark = [pytest.mark.server, pytest.mark.pacs, pytest.mark.slow]

MODEL = "medsegx"
TASK_DEADLINE_S = 600.0
TINY_RUN = {"max_epochs": 1, "slices_per_structure": 1, "val_slices_per_structure": 1,
            "publish": "always", "tracking": "none"}
#: (ground truth of the series, its modality, its label map in sample_data["label_maps"])
LABELS = (("ct_phantom_2", "CT", "ct_phantom"), ("mni152_t1_dicom", "MR", "mni152_t1"))


def wait_for_training(url: str) -> dict:
    """Poll ``GET /train/`` until the last task is no longer running."""
    deadline = time.monotonic() + TASK_DEADLINE_S
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/train/", timeout=30)
        if response.status_code == 200 and response.json().get("status") not in ("SUBMITTED", "RUNNING"):
            return response.json()
        time.sleep(2)  # poll interval
    pytest.fail(f"train task still running after {TASK_DEADLINE_S:.0f} s")


def test_train_task_fine_tunes_on_labels_saved_to_the_pacs(pacs_server, orthanc, sample_data, tmp_path):
    client = pacs_server.client()
    series = {"CT": orthanc.series_uid("CT"), "MR": orthanc.series_uid("MR")}
    for sample, modality, label_map in LABELS:
        names = sample_data["label_maps"][label_map]
        truth = nib.load(sample_data["ground_truth"][sample])
        label_file = tmp_path / f"{sample}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(truth.dataobj).astype(np.uint8), truth.affine), label_file)
        client.save_label(series[modality], str(label_file), tag="final",
                          params={"label_info": [{"name": name, "idx": value} for name, value in names.items()]})
    published = pacs_server.app_dir / "model" / "medsegx.pth"
    click = {"foreground": [[60, 95, 24]], "propagate": False}
    _, before = client.infer(MODEL, series["CT"], click)

    started = client.train_start(MODEL, TINY_RUN)
    assert started.get("status") in ("SUBMITTED", "RUNNING"), started
    task = wait_for_training(pacs_server.url)

    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", details
    assert "medsegx train: epoch 1/1 loss" in details and "published model" in details
    result = client.info()["train_stats"][MODEL]["medsegx"]
    assert result["published"] is True and published.is_file()
    assert sorted(result["training_set"]["volumes"]) == sorted(series.values())  # both read back from the PACS
    structures = {f"{series[modality]}:{name}" for _, modality, label_map in LABELS
                  for name in sample_data["label_maps"][label_map]}
    assert set(result["training_set"]["structures"]) == structures  # names from the DICOM-SEG segments
    _, after = client.infer(MODEL, series["CT"], click)
    assert after["model_version"] == result["model_version"] != before["model_version"]  # served, no restart
