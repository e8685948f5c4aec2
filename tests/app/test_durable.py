"""``lib/durable.py`` on a real studies folder, without a server (the server-level faults: test_faults.py)."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
from lib.durable import partial_files, write_atomically
from lib.guards import StudiesOnlyDatastore
from monailabel.datastore.local import LocalDatastore

EXTENSIONS = ["*.nii.gz", "*.nii"]


@pytest.fixture
def studies(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "image.nii.gz")
    return tmp_path


def open_store(folder, auto_reload: bool = False) -> StudiesOnlyDatastore:
    return StudiesOnlyDatastore.adopt(LocalDatastore(str(folder), extensions=EXTENSIONS, auto_reload=auto_reload))


def test_a_leftover_partial_label_is_removed_at_start_and_never_listed(studies):
    labels = studies / "labels" / "final"
    labels.mkdir(parents=True)
    (labels / ".image.nii.gz.x1y2.partial").write_bytes(b"half a label")
    store = open_store(studies)
    assert store.get_labels_by_image_id("image") == {}
    assert partial_files(labels) == []


def test_a_failed_write_leaves_the_previous_file(studies, tmp_path_factory):
    label = studies / "labels" / "final" / "image.nii"
    label.parent.mkdir(parents=True)
    label.write_bytes(b"the saved label")
    not_a_file = tmp_path_factory.mktemp("folder")  # reading it fails half-way through the write
    with pytest.raises(IsADirectoryError):
        write_atomically(label, source=not_a_file)
    assert label.read_bytes() == b"the saved label"
    assert partial_files(label.parent) == []


def test_the_watcher_reloads_an_index_another_process_replaced(studies):
    server = open_store(studies, auto_reload=True)
    other_process = open_store(studies)  # e.g. MONAI Label's scoring subprocess writing a score
    other_process.update_image_info("image", {"score": 0.5})
    deadline = time.monotonic() + 30
    while server.get_image_info("image").get("score") != 0.5 and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval: the watcher thread reloads the index
    assert server.get_image_info("image").get("score") == 0.5
