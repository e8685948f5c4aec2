"""The app's side of the MONAI Label 0.8.5 workarounds listed in ``docs/MONAILABEL_COMPAT.md``.

That document is the one place that lists the breakages and every fix; this module holds
three of the four that live in the app (the third, #6, has a module of its own):

- **#2 MLflow file store.** MLflow 3 / MONAI 1.6 refuse MONAI Label's default
  ``file://<model>/mlruns`` tracking store. :func:`configure_tracking` makes the conf keys
  ``tracking`` / ``tracking_uri`` (default ``sqlite:///<app>/model/mlflow.db``) the defaults
  of every MONAI Label train task built afterwards (``settings.MONAI_LABEL_TRACKING_*``).
- **#3 dcmqi download.** With a DICOMweb datastore MONAI Label downloads dcmqi from GitHub
  unless ``itkimage2segimage`` is on ``PATH``. :func:`ensure_dcmqi_on_path` (called from
  ``MedSegXApp._download_dcmqi_tools``) finds the tool the ``dcmqi`` wheel installed next to
  the interpreter, puts that folder on ``PATH``, and raises a clear error instead of
  downloading when it is missing.
- **#6 inference blocks the event loop.** ``POST /infer/{model}`` runs the whole inference
  inside an ``async def`` endpoint, so no other request is answered meanwhile.
  ``lib/concurrency.py`` serves that route from a worker thread behind a bounded FIFO queue
  (``--conf infer_queue``, 503 + ``Retry-After``, disconnect and time-cap stops);
  ``MedSegXApp.__init__`` installs it.

- **#10 imports the server never uses.** ``import monai`` imports every MONAI submodule
  (``monai/__init__.py``: ``load_submodules``), and with them every optional package that is
  installed: triton (through torchvision and ``torch._dynamo``), pandas and pyarrow, MLflow,
  matplotlib, scikit-learn, TensorBoard -- ~200 MiB of the server's resident memory, before the
  app is imported. :func:`skip_unused_imports` makes those imports fail in the server process, which
  MONAI handles as a missing optional package; it has to run before ``monailabel.main`` imports
  MONAI, so it runs from this file as the server's launcher (:func:`serve`, ``scripts/start.sh``).
  MONAI Label's train and scoring tasks run in processes of their own and import them all.
  SimpleITK (92 MiB, with pydicom-seg) is needed, but only to convert DICOM and DICOM SEG:
  :func:`defer_dicom_conversion` imports MONAI Label's ``convert`` module, and with it both, on
  the first call of one of its functions instead of at start-up.

- **#11 background tasks start at the server's priority.** MONAI Label starts a train, scoring
  or batch-infer task as ``python -m monailabel.interfaces.utils.app`` (``async_tasks/utils.py``)
  at the server's priority; the task's first seconds (importing torch, MONAI and the app) then
  compete with interactive requests as equals before ``main.py`` can lower the process's
  priority. :func:`start_background_tasks_low` (called from ``MedSegXApp.__init__`` in the
  server) starts those commands under ``chrt --idle 0`` and ``nice -n 19`` when the tools exist
  (util-linux and coreutils), so the whole task runs low from its first instruction.

Not in that list but also MONAI Label's: a failing app constructor reaches the log as a
uvicorn start-up traceback of some forty lines; :func:`one_line_startup_errors` keeps only the
last line for the app's configuration errors, so a bad ``--conf`` fails with one clear line.

The others are handled outside the app: #1 (pydicom-seg vs pydicom 3) by pinning
``pydicom<3`` in ``requirements.txt`` -- it breaks ``import monailabel.app`` before any app
code runs; #4 (the ``monailabel`` launcher runs ``python`` from ``PATH``) by
``scripts/start.sh``; #5 (``params`` is a multipart form field) by the clients, and the infer
task answers 422 "label is required" / "roi is required" when ``params`` did not arrive.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import threading
import types

logger = logging.getLogger(__name__)

DCMQI_TOOL = "itkimage2segimage"
#: Installed packages that only MONAI's eager optional imports load into the server process (#10);
#: the server never calls them: training (MLflow, TensorBoard) and scoring run in their own processes.
SERVER_UNUSED_PACKAGES = ("triton", "pandas", "pyarrow", "mlflow", "matplotlib", "sklearn", "tensorboard")
#: MONAI Label's DICOM <-> NIfTI / DICOM SEG conversions: the server's only importer of pydicom-seg and SimpleITK (#10).
DICOM_CONVERSION_MODULE = "monailabel.datastore.utils.convert"


class _LastLineOnly(logging.Filter):
    """Shortens a logged traceback whose exception line contains ``marker`` to that line."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if isinstance(message, str) and message.startswith("Traceback") and self.marker in message:
            record.msg, record.args = message.rstrip().splitlines()[-1], ()
        return True


def one_line_startup_errors(error_type: type[Exception]) -> None:
    """Log a start-up failure caused by ``error_type`` as its one-line message (idempotent).

    uvicorn logs the text of a failed lifespan start-up (the whole traceback Starlette
    formatted) on the ``uvicorn.error`` logger; the server then exits with code 3.
    """
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _LastLineOnly) for f in server_log.filters):
        server_log.addFilter(_LastLineOnly(f"{error_type.__name__}: "))


def configure_tracking(tracking: str, tracking_uri: str) -> None:
    """Make MONAI Label's train tasks track to ``tracking_uri``, or not at all.

    Args:
        tracking: ``"mlflow"`` or ``"none"``.
        tracking_uri: an MLflow backend URI other than ``file://`` (validated by
            ``AppSettings``).
    """
    from monailabel.config import settings

    settings.MONAI_LABEL_TRACKING_ENABLED = tracking == "mlflow"
    settings.MONAI_LABEL_TRACKING_URI = tracking_uri
    logger.info("train tracking: %s", tracking_uri if tracking == "mlflow" else "off")


def ensure_dcmqi_on_path() -> str:
    """Make ``itkimage2segimage`` (from the ``dcmqi`` wheel) findable; never download it.

    Returns:
        The tool's path.

    Raises:
        RuntimeError: the tool is not installed (``pip install dcmqi``).
    """
    found = shutil.which(DCMQI_TOOL)
    scripts = sysconfig.get_paths()["scripts"]
    if found is None and os.path.isfile(os.path.join(scripts, DCMQI_TOOL)):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
        found = shutil.which(DCMQI_TOOL)
    if found is None:
        raise RuntimeError(
            f"{DCMQI_TOOL} (dcmqi) is needed for DICOM SEG with a DICOMweb datastore and is not on PATH: "
            "pip install dcmqi (MONAI Label would otherwise download dcmqi from GitHub); see docs/MONAILABEL_COMPAT.md #3"
        )
    return found


def start_background_tasks_low(nice: int, sched_idle: bool) -> list[str]:
    """Start MONAI Label's background task processes under ``chrt --idle 0`` / ``nice -n <nice>`` (#11).

    Replaces the ``subprocess`` that ``monailabel.utils.async_tasks.utils`` starts its tasks
    with by one whose ``Popen`` prefixes the command (the tools ``exec`` the task, so its pid, and
    MONAI Label's way of stopping it, stay the same). Idempotent.

    Returns:
        The prefix (empty when neither tool is installed or both are off).
    """
    import subprocess
    import types

    from monailabel.utils.async_tasks import utils as task_utils

    prefix: list[str] = []
    if sched_idle and shutil.which("chrt"):
        prefix += ["chrt", "--idle", "0"]
    if nice > 0 and shutil.which("nice"):
        prefix += ["nice", "-n", str(int(nice))]
    if prefix and task_utils.subprocess is subprocess:

        def popen(command, *args, **kwargs):
            return subprocess.Popen([*prefix, *command], *args, **kwargs)

        task_utils.subprocess = types.SimpleNamespace(Popen=popen, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)
        logger.info("background tasks start under: %s", " ".join(prefix))
    return prefix


def skip_unused_imports(packages: tuple[str, ...] = SERVER_UNUSED_PACKAGES) -> list[str]:
    """Make ``import <package>`` raise ``ModuleNotFoundError`` in this process (#10).

    A ``None`` entry in ``sys.modules`` is Python's own way to halt an import;
    ``importlib.util.find_spec`` then answers ``None``, as for a package that is not installed,
    which is what MONAI's ``optional_import`` and PyTorch's triton probe check.
    Already imported packages are left alone.

    Returns:
        the packages skipped.
    """
    skipped = [name for name in packages if name not in sys.modules]
    for name in skipped:
        sys.modules[name] = None
    return skipped


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its functions is called (#10).

    ``from <module> import <function>`` binds a forwarder that imports the real module on its
    first call and calls the real function; any other attribute imports it at once. The real
    module then replaces this one in ``sys.modules``, so later imports get it directly.
    """

    def __init__(self, name: str, origin: str, functions: list[str]):
        super().__init__(name, f"{name}, imported on first use (apps/medsegx/lib/compat.py)")
        self.__file__ = origin
        self._real_module: types.ModuleType | None = None
        self._import_lock = threading.Lock()
        for function_name in functions:
            setattr(self, function_name, self._forwarder(function_name))

    def _forwarder(self, function_name: str):
        def forward(*args, **kwargs):
            return getattr(self._real(), function_name)(*args, **kwargs)

        forward.__name__ = forward.__qualname__ = function_name
        forward.__module__ = self.__name__
        return forward

    def _real(self) -> types.ModuleType:
        with self._import_lock:
            if self._real_module is None:
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
                try:
                    self._real_module = importlib.import_module(self.__name__)
                except BaseException:
                    sys.modules.setdefault(self.__name__, self)
                    raise
                logger.info("imported %s on first use", self.__name__)
            return self._real_module

    def __getattr__(self, attribute: str):  # only for names __init__ did not set
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self._real(), attribute)


def defer_dicom_conversion(module_name: str = DICOM_CONVERSION_MODULE) -> bool:
    """Import MONAI Label's DICOM conversion module (and SimpleITK, pydicom-seg) on first use (#10).

    ``monailabel.endpoints.infer`` and the DICOMweb datastore import its functions at module
    level, which loads SimpleITK (92 MiB) into every server, also one that never converts a
    DICOM series or writes a DICOM SEG. A :class:`_DeferredModule` takes its place: its
    functions are forwarders named from the module's source (``ast``, nothing is imported),
    so the first conversion imports it (a one-off cost on that request) and behaves as before.
    Must run before anything imports the module; a no-op when it is imported already or missing.

    Returns:
        True when the stand-in was installed.
    """
    if module_name in sys.modules:
        return False
    top, _, rest = module_name.partition(".")
    package = importlib.util.find_spec(top)  # finds the top-level package without importing it
    if package is None or not package.submodule_search_locations:
        return False
    origin = os.path.join(package.submodule_search_locations[0], *rest.split(".")) + ".py"
    try:
        with open(origin, encoding="utf-8") as source:
            tree = ast.parse(source.read(), origin)
    except (OSError, SyntaxError, ValueError):
        return False
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    sys.modules[module_name] = _DeferredModule(module_name, origin, functions)
    return True


def serve(argv: list[str]) -> int:
    """``monailabel <argv>`` (``monailabel.main``) after :func:`skip_unused_imports` and
    :func:`defer_dicom_conversion`: the server's launcher."""
    skip_unused_imports()
    defer_dicom_conversion()
    from monailabel.main import Main  # imports MONAI

    sys.argv = ["monailabel", *argv]
    Main().run()
    return 0


if __name__ == "__main__":  # python apps/medsegx/lib/compat.py start_server --app apps/medsegx ...
    here = os.path.realpath(os.path.dirname(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]  # lib/'s modules are not top-level
    sys.exit(serve(sys.argv[1:]))
