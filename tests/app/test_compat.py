"""The app's MONAI Label 0.8.5 workarounds (docs/MONAILABEL_COMPAT.md #2, #3, #10, start-up errors)."""

import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from lib import compat
from lib.settings import AppConfigError

LIB_DIR = Path(compat.__file__).resolve().parent


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


def run_python(code: str, **env: str) -> str:
    """``code`` in a fresh interpreter with the app's folder on the path (this process keeps its imports)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=LIB_DIR.parent, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_skipped_packages_look_uninstalled_to_monai_and_torch():
    out = run_python(
        "from lib import compat; skipped = compat.skip_unused_imports()\n"
        "import importlib.util, monai\n"
        "from monai.utils import optional_import\n"
        "from torch.utils._triton import has_triton_package\n"
        "print(sorted(skipped), [optional_import(n)[1] for n in skipped], importlib.util.find_spec('pandas'),"
        " has_triton_package())"
    )
    skipped = sorted(compat.SERVER_UNUSED_PACKAGES)
    assert out.split() == [*str(skipped).split(), *str([False] * len(skipped)).split(), "None", "False"]


def test_dicom_conversion_is_imported_on_first_use_and_works():
    """The launcher's stand-in for MONAI Label's convert module: importing what the server imports
    loads neither SimpleITK nor pydicom-seg; the first conversion does, and converts as before."""
    out = run_python(
        "import sys, tempfile, numpy as np, nibabel as nib\n"
        "from lib import compat\n"
        "compat.skip_unused_imports(); print('OUT', compat.defer_dicom_conversion())\n"
        "import monailabel.app\n"
        "from monailabel.endpoints.infer import binary_to_image\n"
        "from monailabel.datastore.dicom import DICOMWebDatastore\n"
        "print('OUT', 'SimpleITK' in sys.modules, 'pydicom_seg' in sys.modules)\n"
        "folder = tempfile.mkdtemp()\n"
        "affine = np.diag([0.8, 0.8, 2.5, 1.0])\n"
        "nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine), folder + '/image.nii.gz')\n"
        "label = (np.arange(120) % 3).astype(np.uint8).reshape((6, 5, 4), order='F')\n"
        "label.ravel(order='F').tofile(folder + '/label.bin')\n"
        "written = nib.load(binary_to_image(folder + '/image.nii.gz', folder + '/label.bin'))\n"
        "print('OUT', np.array_equal(np.asarray(written.dataobj), label), np.allclose(written.affine, affine))\n"
        "import monailabel.datastore.utils.convert as convert\n"
        "print('OUT', 'SimpleITK' in sys.modules, type(convert).__name__, convert.nifti_to_dicom_seg.__module__)\n"
        "print('OUT', compat.defer_dicom_conversion())\n"
    )
    lines = [line.split()[1:] for line in out.splitlines() if line.startswith("OUT ")]  # monailabel.app prints too
    assert lines == [["True"], ["False", "False"], ["True", "True"],
                     ["True", "module", "monailabel.datastore.utils.convert"], ["False"]], out


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not glibc(), reason="the allocator setting is glibc's")
def test_large_buffers_are_mapped_unless_the_environment_says_otherwise():
    code = "from lib import allocator; print(allocator.map_large_buffers())"
    assert run_python(code).strip() == "True"
    assert run_python(code, MALLOC_MMAP_THRESHOLD_="1048576").strip() == "False"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the server's /proc/<pid>/maps")
def test_launcher_serves_without_the_unused_packages(sample_data, server_launcher, tmp_path):
    """The real server started as scripts/start.sh starts it answers a box; no shared library of a
    skipped package (pandas, pyarrow, triton, matplotlib, scikit-learn) is mapped into it, nor
    SimpleITK's (MONAI Label's DICOM conversion module is deferred until used); the allocator
    setting is in effect (its log line)."""
    app_dir = server_launcher.copy_app(tmp_path / "app")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, str(app_dir / "lib" / "compat.py"), "start_server", "--app", str(app_dir),
               "--studies", str(sample_data["datastore"]), "--host", "127.0.0.1", "--port", port,
               "--conf", "prefetch_slices", "0", "--conf", "tracking", "none"]
    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env={**server_launcher.env(), "MEDSEGX_RUNTIME": "eager"}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        server_launcher.wait_until_serving(url, process, log, 300)
        from monailabel.client import MONAILabelClient

        (tmp_path / "client").mkdir()
        _, result = MONAILabelClient(url, tmpdir=str(tmp_path / "client")).infer(
            "medsegx", "ct_phantom", {"label": "liver", "roi": [17, 99, 56, 128, 20, 20]})
        assert result["voxels"] > 0
        mapped = Path(f"/proc/{process.pid}/maps").read_text()
        for package in compat.SERVER_UNUSED_PACKAGES:
            assert f"/site-packages/{package}/" not in mapped, package
        assert "/site-packages/SimpleITK/" not in mapped
        assert "malloc: buffers of 128 KiB or more are mapped" in log.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
