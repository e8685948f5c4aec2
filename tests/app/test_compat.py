"""The app's MONAI Label 0.8.5 workarounds (docs/MONAILABEL_COMPAT.md #2, #3, start-up errors)."""

import logging
import os
import sysconfig

import pytest
from lib import compat
from lib.settings import AppConfigError


def test_dcmqi_found_next_to_the_interpreter_without_download(monkeypatch):
    scripts = sysconfig.get_paths()["scripts"]
    if not os.path.isfile(os.path.join(scripts, compat.DCMQI_TOOL)):
        pytest.skip("the dcmqi wheel is not installed in this environment")
    path_without_venv = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != scripts)
    monkeypatch.setenv("PATH", path_without_venv)
    assert compat.ensure_dcmqi_on_path() == os.path.join(scripts, compat.DCMQI_TOOL)


def test_missing_dcmqi_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(compat.sysconfig, "get_paths", lambda: {"scripts": "/nonexistent"})
    with pytest.raises(RuntimeError, match="pip install dcmqi"):
        compat.ensure_dcmqi_on_path()


def test_tracking_goes_to_the_configured_uri(monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_TRACKING_URI", "")
    monkeypatch.setattr(settings, "MONAI_LABEL_TRACKING_ENABLED", True)
    compat.configure_tracking("mlflow", "sqlite:////tmp/x/mlflow.db")
    assert settings.MONAI_LABEL_TRACKING_URI == "sqlite:////tmp/x/mlflow.db"
    compat.configure_tracking("none", "sqlite:////tmp/x/mlflow.db")
    assert settings.MONAI_LABEL_TRACKING_ENABLED is False


def test_startup_traceback_of_a_config_error_is_one_line():
    compat.one_line_startup_errors(AppConfigError)
    server_log = logging.getLogger("uvicorn.error")
    traceback_text = (
        "Traceback (most recent call last):\n  File \"main.py\", line 1, in <module>\n"
        "lib.configs.settings.AppConfigError: --conf device 'tpu' is not cpu, cuda, cuda:N or mps\n"
    )
    record = server_log.makeRecord(server_log.name, logging.ERROR, __file__, 1, traceback_text, (), None)
    assert all(f.filter(record) for f in server_log.filters)
    assert record.getMessage() == "lib.configs.settings.AppConfigError: --conf device 'tpu' is not cpu, cuda, cuda:N or mps"
    other = server_log.makeRecord(server_log.name, logging.ERROR, __file__, 1, "Traceback ...\nKeyError: 'x'", (), None)
    assert all(f.filter(other) for f in server_log.filters)
    assert other.getMessage().startswith("Traceback")
