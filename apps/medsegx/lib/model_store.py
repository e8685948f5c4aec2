"""One model and one ``Predictor`` per server process, reloaded when a newer checkpoint lands.

The checkpoint in effect is the last existing file of ``AppSettings.checkpoint_paths``
(``[pretrained, model/medsegx.pth]``); with none, the backbone's own weights are used (the
embedded LiteMedSAM for ``lite``). A train task publishes ``model/medsegx.pth`` atomically
(``medsegx.checkpoint.save_checkpoint``: temporary file + rename); the next request sees a new
``(path, mtime, size)`` stamp and loads it on top of the running model -- no restart. The
embedding cache is cleared on every reload: embeddings depend on the adapters' weights.

On the CPU the predictor runs OpenVINO graphs of the encoder and decoder
(``medsegx.runtime.ServingRuntime``). Their export starts when the model is built and again
when a reload changes the weights, in a background thread; requests are served by eager
PyTorch with the *new* weights until the graphs are ready, so a published checkpoint is in
effect from the next request on. Converted graphs are kept per weight set in
``medsegx.runtime.default_cache_dir()`` (``$MEDSEGX_RUNTIME_CACHE``, else
``~/.cache/medsegx/runtime``: outside the repository), so a restart on the same weights skips
the conversion. ``MEDSEGX_RUNTIME=eager`` turns the runtime off. MONAI Label's background
train / scoring processes always run eager.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medsegx.build import build_model
from medsegx.checkpoint import CheckpointError, load_checkpoint, previous_checkpoint_path, temporaries_beside
from medsegx.modeling import MedSegXModel
from medsegx.predictor import Predictor

from lib.background import in_background_process
from lib.durable import remove_leftovers
from lib.settings import AppSettings

logger = logging.getLogger(__name__)

EMBEDDED_LITE_VERSION = "embedded-lite"
_NOTHING = ("<no stamp>",)  # "no failed load"; distinct from None, the stamp of "no checkpoint file"


@dataclass(frozen=True)
class LoadedModel:
    """What a request runs on.

    Attributes:
        predictor: the process-wide predictor (its cache is shared across requests).
        version: ``metadata["model_version"]`` of the checkpoint, ``"embedded-lite"`` for the
            bundled LiteMedSAM, ``"sam-<backbone>"`` for a bare SAM backbone.
        checkpoint: the MedSegX checkpoint file in use, or ``None``.
        reload_error: why the newest checkpoint could not be loaded (the previous model
            keeps serving), else ``None``.
    """

    predictor: Predictor
    version: str
    checkpoint: Path | None
    reload_error: str | None = None


def _stamp(path: Path | None) -> tuple | None:
    if path is None:
        return None
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


class ModelStore:
    """Builds the model once, then swaps checkpoints in when their file changes.

    Args:
        settings: parsed ``--conf``.
    """

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._stamp: tuple | None = None
        self._failed_stamp: tuple | None = _NOTHING
        if not in_background_process():  # the server starts before any train task that could be writing them
            self.remove_partial_checkpoints()

    def remove_partial_checkpoints(self) -> list[Path]:
        """Remove the temporary files of a publish that a kill interrupted (they are never loaded)."""
        paths = [*self.settings.checkpoint_paths, *map(previous_checkpoint_path, self.settings.checkpoint_paths)]
        return remove_leftovers([tmp for path in paths for tmp in temporaries_beside(path)],
                                "partial checkpoint file(s) of an interrupted publish")

    def newest_checkpoint(self) -> Path | None:
        """The last existing file of ``settings.checkpoint_paths``."""
        existing = [path for path in self.settings.checkpoint_paths if path.is_file()]
        return existing[-1] if existing else None

    @contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """The model for one request, (re)loaded first when the newest checkpoint changed.

        Requests run one at a time on the process's model (the predictor serialises encoder
        passes anyway), so a reload never swaps weights under a running request.

        Raises:
            CheckpointError / ValueError: only on the first load (at start); later failures
                keep the previous model and are reported in ``reload_error``.
        """
        with self._lock:
            yield self._refresh()

    @contextmanager
    def use_served(self) -> Iterator[LoadedModel | None]:
        """The model served now, never reloaded here (background work between requests, ``lib/prefetch.py``).

        Holds the same lock as ``use``: a reload (new weights, a cleared cache) never runs
        while background work uses the model. ``None`` before the first load.
        """
        with self._lock:
            yield self._loaded

    def _refresh(self) -> LoadedModel:
        checkpoint = self.newest_checkpoint()
        try:
            stamp = _stamp(checkpoint)
        except FileNotFoundError:  # replaced between is_file() and stat(): look again
            checkpoint = self.newest_checkpoint()
            stamp = _stamp(checkpoint)
        if self._loaded is None:
            self._loaded = self._build(checkpoint)
            self._stamp = stamp
        elif stamp not in (self._stamp, self._failed_stamp):
            try:
                self._loaded = self._reload(checkpoint)
                self._stamp, self._failed_stamp = stamp, _NOTHING
            except (CheckpointError, OSError, RuntimeError) as err:
                logger.error("keeping model %s: cannot load %s: %s", self._loaded.version, checkpoint, err)
                self._failed_stamp = stamp
                self._loaded = LoadedModel(self._loaded.predictor, self._loaded.version, self._loaded.checkpoint,
                                           reload_error=f"{checkpoint}: {err}")
        return self._loaded

    def _build(self, checkpoint: Path | None) -> LoadedModel:
        settings = self.settings
        logger.info("building %s model on %s (checkpoint: %s)", settings.backbone, settings.device, checkpoint or "none")
        model = build_model(settings.backbone, sam_checkpoint=settings.sam_checkpoint, checkpoint=checkpoint,
                            device=settings.device)
        predictor = Predictor(model, cache_size=settings.cache_size, runtime=runtime_mode())
        predictor.serving.current()  # start the export now, off the request path
        return LoadedModel(predictor, self._version(model, checkpoint), checkpoint)

    def _reload(self, checkpoint: Path | None) -> LoadedModel:
        if checkpoint is None:  # the checkpoint was removed: back to the backbone's own weights
            return self._build(None)
        predictor = self._loaded.predictor
        load_checkpoint(predictor.model, checkpoint)
        predictor.clear_cache()
        predictor.serving.current()  # new weights: eager serves them until their graphs are exported
        version = self._version(predictor.model, checkpoint)
        logger.info("reloaded model %s from %s", version, checkpoint)
        return LoadedModel(predictor, version, checkpoint)

    def runtime_status(self) -> dict:
        """What runs the model now, for ``/info``: runtime name, mode, last export seconds and error."""
        loaded = self._loaded
        if loaded is None:
            return {"runtime": None}
        serving = loaded.predictor.serving
        export_s = serving.last_export_s
        return {"runtime": serving.name, "mode": serving.mode,
                "export_s": round(export_s, 1) if export_s is not None else None, "error": serving.last_error}

    def _version(self, model: MedSegXModel, checkpoint: Path | None) -> str:
        if checkpoint is not None:
            version = (getattr(model, "metadata", None) or {}).get("model_version")
            return str(version) if version else f"{checkpoint.name}@{int(checkpoint.stat().st_mtime)}"
        return EMBEDDED_LITE_VERSION if self.settings.backbone == "lite" else f"sam-{self.settings.backbone}"


def configured_runtime_mode() -> str:
    """``$MEDSEGX_RUNTIME`` (``auto`` | ``openvino`` | ``eager``), default ``auto``: how the server serves."""
    return os.environ.get("MEDSEGX_RUNTIME", "auto").strip() or "auto"


def runtime_mode() -> str:
    """``configured_runtime_mode()`` in the server; always eager in MONAI Label's background train /
    scoring processes (no export there)."""
    if in_background_process():
        return "eager"
    return configured_runtime_mode()
