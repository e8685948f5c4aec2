"""App-test setup: the app's own ``lib`` importable as MONAI Label's loader makes it, and the server fixtures."""

import sys
from pathlib import Path

import pytest

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
