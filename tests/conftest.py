"""Shared fixtures: the built sample data and a real MONAI Label server running the app.

The server fixture starts the app's launcher on a copy of ``apps/medsegx`` (``python
<copy>/lib/compat.py start_server --app <copy>``: ``monailabel.main``, as ``scripts/start.sh`` runs it) as a
subprocess on a free port of 127.0.0.1, waits for ``GET /info/`` to answer (polling with a
deadline, failing early if the process dies), yields a small handle with a
``MONAILabelClient``, and stops the server at the end of the session. The server log goes to
a file whose tail is put into failure messages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "medsegx"
BUILDER = REPO / "sample-data" / "build_sample_data.py"
SERVER_START_TIMEOUT_S = float(os.environ.get("MEDSEGX_TEST_SERVER_TIMEOUT", "300"))


def load_module(name: str, path: Path):
    """Import a file that is not on ``sys.path`` (the sample-data builder script)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def copy_app(destination: Path) -> Path:
    """A private copy of the app: its model/, logs/ and bin/ never touch the checkout."""
    shutil.copytree(APP_DIR, destination, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    return destination


def server_command(app_dir: Path, studies: Path | str, port: int, *extra: str) -> list[str]:
    # The app's launcher, as scripts/start.sh runs it: `monailabel.main` without the optional imports
    # the server never uses (docs/MONAILABEL_COMPAT.md #10).
    if "prefetch_slices" not in extra:
        # idle-time prefetch off unless a test asks for it (tests/app/test_prefetch.py): the tests
        # say which boxes must miss the embedding cache, and a prefetched neighbour would not
        extra = (*extra, "--conf", "prefetch_slices", "0")
    return [sys.executable, str(app_dir / "lib" / "compat.py"), "start_server", "--app", str(app_dir),
            "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), *extra]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    scripts = sysconfig.get_paths()["scripts"]
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")  # `python` and itkimage2segimage
    env["MONAILABEL_PYEXE"] = sys.executable
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    app_dir: Path
    client_dir: Path

    def client(self):
        from monailabel.client import MONAILabelClient

        return MONAILabelClient(self.url, tmpdir=str(self.client_dir))

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log, lines)


def wait_until_answering(probe_url: str, process: subprocess.Popen, log: Path, timeout_s: float,
                         what: str = "server", poll_s: float = 0.5) -> None:
    """Poll ``probe_url`` until it answers 200; fail with the log tail on exit or timeout."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with code {process.returncode} before serving:\n{log_tail(log)}")
        try:
            if requests.get(probe_url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(poll_s)  # poll interval, not a wait for readiness
    pytest.fail(f"{what} did not answer {probe_url} within {timeout_s:.0f} s:\n{log_tail(log)}")


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float, probe: str = "/info/") -> None:
    """Poll the MONAI Label server's ``probe`` (``/info/``; ``/auth/`` when a token guards the rest) until it answers."""
    wait_until_answering(f"{url}{probe}", process, log, timeout_s)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def serve(root: Path, studies: Path | str, *extra: str, probe: str = "/info/"):
    """Run ``monailabel start_server`` with a copy of the app in ``root`` until the generator is closed.

    Yields the ``Server`` once ``GET <probe>`` answers; ``extra`` goes to ``start_server``
    (e.g. ``"--conf", "infer_queue", "1"``).
    """
    app_dir = copy_app(root / "app")
    log = root / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(server_command(app_dir, studies, port, *extra), stdout=log_file,
                                   stderr=subprocess.STDOUT, env=server_env(), cwd=root, start_new_session=True)
    server = Server(url, process, log, app_dir, root / "client")
    server.client_dir.mkdir()
    try:
        wait_until_serving(url, process, log, SERVER_START_TIMEOUT_S, probe)
        yield server
    finally:
        stop(process)


class Launcher:
    """How the fixtures start a server, for tests that start their own (e.g. to see it fail)."""

    copy_app = staticmethod(copy_app)
    env = staticmethod(server_env)
    serve = staticmethod(serve)
    wait_until_serving = staticmethod(wait_until_serving)

    @staticmethod
    def command(app_dir: Path, studies: Path | str, *extra: str) -> list[str]:
        return server_command(app_dir, studies, free_port(), *extra)


@pytest.fixture(scope="session")
def server_launcher() -> Launcher:
    return Launcher()


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> dict:
    """The sample studies built into a temporary folder (``build`` from ``sample-data/``)."""
    builder = load_module("build_sample_data", BUILDER)
    return builder.build(tmp_path_factory.mktemp("sample-data") / "datastore")


@pytest.fixture(scope="session")
def medsegx_server(sample_data, tmp_path_factory):
    """A running ``monailabel start_server`` with the app on the sample datastore."""
    yield from serve(tmp_path_factory.mktemp("server"), sample_data["datastore"])


# --------------------------------------------------------------------------- PACS (Orthanc)

PACS_SCRIPT = REPO / "scripts" / "pacs.sh"
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_START_TIMEOUT_S = 60.0
#: MONAI Label lists only CT series by default (MONAI_LABEL_DICOMWEB_SEARCH_FILTER); QIDO's list match adds MR.
PACS_SEARCH_FILTER = '{"Modality": "CT,MR"}'


@dataclass
class Orthanc:
    """A running Orthanc (``scripts/pacs.sh serve``) on a free loopback port, holding the sample series."""

    url: str
    process: subprocess.Popen
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def series_uid(self, modality: str) -> str:
        """The ``SeriesInstanceUID`` of the one uploaded sample series of ``modality`` (``CT`` / ``MR``)."""
        import requests

        found = requests.get(f"{self.dicomweb}/series", params={"Modality": modality}, timeout=30).json()
        if len(found) != 1:
            pytest.fail(f"expected one {modality} series in Orthanc, found {len(found)}")
        return found[0]["0020000E"]["Value"][0]


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (``None`` when it can)."""
    if shutil.which("Orthanc") is None or not ORTHANC_DICOMWEB_PLUGIN.is_file():
        return "Orthanc + DICOMweb plugin not installed (bash scripts/pacs.sh install; scripts/test.sh does it)"
    if shutil.which("curl") is None:
        return "curl not installed (scripts/pacs.sh uploads with it)"
    return None


ARTIFACTS = Path(os.environ.get("MEDSEGX_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep what a person should look at (screenshots, timings); git-ignored."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def pacs_timings(artifacts_dir):
    """Seconds measured by the PACS tests, written to ``<artifacts>/pacs_timings.json`` at the end."""
    import json

    timings: dict[str, float] = {}
    yield timings
    if timings:
        load = os.getloadavg() if hasattr(os, "getloadavg") else ()
        record = {"seconds": {k: round(v, 2) for k, v in timings.items()}, "load_average_1_5_15": load,
                  "cpus": os.cpu_count()}
        (artifacts_dir / "pacs_timings.json").write_text(json.dumps(record, indent=2) + "\n")


@pytest.fixture(scope="session")
def orthanc(sample_data, tmp_path_factory, pacs_timings):
    """Orthanc with the sample CT and MR series, started and stopped by the session."""
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    env = {**os.environ, "ORTHANC_HTTP_PORT": str(port), "ORTHANC_DIR": str(root)}
    log = root / "orthanc.log"
    started = time.perf_counter()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(["bash", str(PACS_SCRIPT), "serve"], stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    pacs = Orthanc(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_answering(f"{pacs.url}/system", process, log, ORTHANC_START_TIMEOUT_S, what="Orthanc", poll_s=0.2)
        series = [sample_data["dicom_series"][name] for name in ("ct_phantom_2", "mni152_t1")]
        subprocess.run(["bash", str(PACS_SCRIPT), "upload", *series], env=env, check=True, capture_output=True)
        pacs_timings["orthanc_start_and_upload_143_instances"] = time.perf_counter() - started
        yield pacs
    finally:
        stop(process)


@pytest.fixture(scope="session")
def pacs_serve(orthanc):
    """Starts a MONAI Label server on Orthanc's DICOMweb with its own cache: ``yield from pacs_serve(root)``."""

    def start(root: Path, *extra: str):
        with pytest.MonkeyPatch.context() as patch:  # read by the server process when it starts
            patch.setenv("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", PACS_SEARCH_FILTER)
            patch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(root / "dicomweb-cache"))
            servers = serve(root, orthanc.dicomweb, *extra)
            server = next(servers)
        yield server
        servers.close()

    return start


@pytest.fixture(scope="session")
def pacs_server(pacs_serve, tmp_path_factory):
    """A MONAI Label server with ``--studies <orthanc>/dicom-web``, shared by the PACS tests."""
    yield from pacs_serve(tmp_path_factory.mktemp("pacs-server"))
