"""A server started with ``$MEDSEGX_API_TOKEN`` refuses unauthenticated requests (``lib/auth.py``).

Its own ``monailabel start_server`` subprocess on 127.0.0.1; the stock 3D Slicer plugin's client
(``MONAILabelLib/client.py`` from the monailabel wheel) logs in the way the plugin does
(``MONAILabel.py`` ``_client``: ``auth_enabled`` -> ``auth_token(user, password)`` ->
``update_auth`` -> ``auth_valid_token``) with the token as the password.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.server

TOKEN = "test-token-0123456789abcdef"
SLICER_CLIENT = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"


@pytest.fixture(scope="module")
def token_server(server_launcher, sample_data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # read by the server process when it starts
        patch.setenv("MEDSEGX_API_TOKEN", TOKEN)
        patch.setenv("MEDSEGX_RUNTIME", "eager")
        patch.setenv("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
        servers = server_launcher.serve(tmp_path_factory.mktemp("auth-server"), sample_data["datastore"],
                                        "--conf", "tracking", "none", probe="/auth/")
        server = next(servers)
    yield server
    servers.close()


@pytest.fixture(scope="module")
def slicer_client(token_server, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client_auth", SLICER_CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_request_without_the_token_is_401(token_server):
    response = requests.get(f"{token_server.url}/info/", timeout=30)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_token_is_401_and_the_right_one_200(token_server):
    wrong = requests.get(f"{token_server.url}/info/", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    not_bearer = requests.get(f"{token_server.url}/info/", headers={"Authorization": f"Basic {TOKEN}"}, timeout=30)
    assert not_bearer.status_code == 401
    right = requests.get(f"{token_server.url}/info/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert right.status_code == 200 and "medsegx" in right.json()["models"]


def test_an_unauthenticated_upload_is_refused_before_it_is_saved(token_server, sample_data):
    label = Path(sample_data["labels"]["ct_phantom"])
    before = requests.get(f"{token_server.url}/datastore/", params={"output": "all"},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    with open(label, "rb") as stream:
        response = requests.put(f"{token_server.url}/datastore/label", params={"image": "ct_phantom_unlabelled"},
                                files={"label": (label.name, stream)}, timeout=60)
    assert response.status_code == 401
    after = requests.get(f"{token_server.url}/datastore/", params={"output": "all"},
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert after["objects"]["ct_phantom_unlabelled"]["labels"] == before["objects"]["ct_phantom_unlabelled"]["labels"]


def test_the_stock_slicer_client_logs_in_with_the_token_as_password(token_server, slicer_client, tmp_path):
    client = slicer_client.MONAILabelClient(token_server.url, tmpdir=str(tmp_path))
    with pytest.raises(slicer_client.MONAILabelClientException):
        client.info()  # not logged in yet: 401
    assert client.auth_enabled() is True
    with pytest.raises(slicer_client.MONAILabelClientException, match="401"):
        client.auth_token("annotator", "wrong password")
    client.update_auth(client.auth_token("annotator", TOKEN))
    assert client.auth_valid_token() is True
    assert "medsegx" in client.info()["models"]
