"""MONAI Label app for MedSegX (ConMoAE-SAM): wiring only.

    monailabel start_server --app apps/medsegx --studies <folder or DICOMweb URL> \
        [--conf backbone lite|vit_b|vit_l|vit_h] [--conf sam_checkpoint PATH] \
        [--conf medsegx_checkpoint PATH] [--conf device cpu|cuda[:N]] [--conf cache_size N] [--conf prefetch_slices N] \
        [--conf tracking mlflow|none] [--conf tracking_uri sqlite:///...] [--conf infer_queue N] \
        [--conf max_voxels N] [--conf max_upload_mb N]
    MEDSEGX_API_TOKEN=<secret> in the environment: every request needs ``Authorization: Bearer <secret>``

Options are parsed once into ``lib.settings.AppSettings``; the app's part of the
MONAI Label 0.8.5 workarounds (``docs/MONAILABEL_COMPAT.md``) is in ``lib/compat.py`` and, for
inference off the event loop (#6), ``lib/concurrency.py``; what a client may make the server read (#8),
``lib/guards.py``; the API token, ``lib/auth.py``; atomic label writes (#9), ``lib/durable.py``; the request format is documented in
``lib/infers/medsegx.py`` and ``README.md``.
"""

import logging
import os
from typing import Any

import medsegx
from monailabel.config import settings as monailabel_settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib import allocator, auth, compat
from lib.background import BACKGROUND_NICE, BACKGROUND_SCHED_IDLE, in_background_process, start_background_low
from lib.concurrency import InferQueue, install_in_server
from lib.configs.medsegx import MedSegX
from lib.dicomweb import PACSDatastore
from lib.guards import StudiesOnlyDatastore, check_app_image
from lib.interactive import InteractiveMarker, marker_path
from lib.settings import AppConfigError, AppSettings

logger = logging.getLogger(__name__)
start_background_low()  # a train / scoring process: low priority before it builds the app and model
if not in_background_process():  # before the model, images and embeddings are allocated
    allocator.map_large_buffers()


class MedSegXApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        compat.one_line_startup_errors(AppConfigError)
        self.settings = AppSettings.from_conf(conf, app_dir)
        self.model_dir = str(self.settings.model_dir)
        os.makedirs(self.model_dir, exist_ok=True)
        compat.configure_tracking(self.settings.tracking, self.settings.tracking_uri)

        # the server marks its interactive work for the background train task (lib/interactive.py);
        # the train process builds this app too, and must not overwrite the server's marker
        marker = None
        if not in_background_process():
            marker = InteractiveMarker(marker_path(self.model_dir))
            # before MONAI Label starts the start-up scoring task (docs/MONAILABEL_COMPAT.md #11)
            compat.start_background_tasks_low(BACKGROUND_NICE, BACKGROUND_SCHED_IDLE)
        self.infer_queue = InferQueue(self.settings.infer_queue, monailabel_settings.MONAI_LABEL_INFER_TIMEOUT,
                                      marker=marker)
        self.models = {"medsegx": MedSegX()}
        for name, task_config in self.models.items():
            task_config.init(name, self.model_dir, conf, None, settings=self.settings, busy=self.infer_queue.busy)

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSegX (ConMoAE-SAM)",
            description="Box-prompt segmentation of any MedSegDB structure, on a slice or propagated in 3D",
            version=medsegx.__version__,
        )
        max_upload_bytes = self.settings.max_upload_mb * 1024 * 1024
        if install_in_server(self.infer_queue, max_upload_bytes) and self._infers_threadpool is not None:
            # MONAI_LABEL_INFER_CONCURRENCY: the queue's worker thread already keeps the loop free, and
            # upstream's pool would run the task where the queue cannot stop it (docs/MONAILABEL_COMPAT.md #6)
            logger.info("MONAI_LABEL_INFER_CONCURRENCY ignored: inference runs in the app's queue")
            self._infers_threadpool.shutdown(wait=False)
            self._infers_threadpool = None
        auth.install_in_server()  # last: the token is checked before any other wrapper reads a body

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, task_config in self.models.items():
            tasks = task_config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers = {name: task_config.trainer() for name, task_config in self.models.items()}
        return {name: trainer for name, trainer in trainers.items() if trainer is not None}

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for task_config in self.models.values():
            strategies.update(task_config.strategy() or {})
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        methods: dict[str, ScoringMethod] = {}
        for task_config in self.models.values():
            methods.update(task_config.scoring_method() or {})
        return methods

    def init_datastore(self):
        store = super().init_datastore()
        # a studies folder: ids, tags and symlinks stay inside it (docs/MONAILABEL_COMPAT.md #8)
        return StudiesOnlyDatastore.adopt(store) if type(store) is LocalDatastore else store

    def _init_dicomweb_datastore(self):
        # upstream's DICOMweb datastore with the fixes a PACS needs (docs/MONAILABEL_COMPAT.md #7)
        return PACSDatastore.adopt(super()._init_dicomweb_datastore(), self.models["medsegx"].label_map.labels)

    def _download_dcmqi_tools(self):
        compat.ensure_dcmqi_on_path()  # MONAI Label would download dcmqi from GitHub

    def infer(self, request: dict[str, Any], datastore=None):
        # upstream reads any existing path: only a datastore id, or the upload / session that
        # POST /infer vetted (lib/guards.py, docs/MONAILABEL_COMPAT.md #8)
        check_app_image(request.get("image"), datastore if datastore else self.datastore())
        return super().infer(request, datastore)

    def info(self):
        info = super().info()
        # The labels live in each model's entry (OHIF reads them there). The top-level list
        # stays empty: the 0.8.5 Slicer plugin's "Next Sample" auto-runs a *segmentation*
        # model for any top-level label found in a model's labels (MONAILabel.py initSample),
        # and with no segmentation model it posts to /infer/ and shows an error popup.
        info["labels"] = []
        info["medsegx"] = {**self.settings.summary(), "inference": self.infer_queue.status(),
                           "prefetch": self.models["medsegx"].prefetcher.status()}
        return info
