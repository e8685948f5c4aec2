"""App-test setup: the app's own ``lib`` importable as MONAI Label's loader makes it, and the server fixtures."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slicer_helpers import load_slicer_client_module

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "medsegx"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))


@pytest.fixture(scope="module")
def server(medsegx_server):
    """The session's MONAI Label server (tests/conftest.py) under the short name tests use."""
    return medsegx_server


@pytest.fixture(scope="module")
def client(server):
    """A ``MONAILabelClient`` for that server, as 3D Slicer's plugin uses it."""
    return server.client()


@pytest.fixture(scope="module")
def slicer_client_module():
    """The installed Slicer plugin's ``MONAILabelLib/client.py`` (``slicer_helpers.load_slicer_client_module``)."""
    return load_slicer_client_module()


@pytest.fixture(scope="module")
def slicer(server, slicer_client_module, tmp_path_factory):
    """The Slicer plugin's ``MONAILabelClient`` (its own class, not monailabel.client's)."""
    return slicer_client_module.MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("slicer")))


@pytest.fixture(scope="module")
def ct_phantom(sample_data):
    """The sample CT (``ct_phantom`` in the datastore): its NIfTI image and its label ``(i, j, k)`` int16."""
    image = nib.load(sample_data["images"]["ct_phantom"])
    label = np.asarray(nib.load(sample_data["labels"]["ct_phantom"]).dataobj).astype(np.int16)
    return image, label
