"""TaskConfig of the ``medsegx`` model (MONAI Label's convention: the module name is the model name)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medsegx.checkpoint import CheckpointError
from medsegx.propagation import SessionCache
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning.uncertainty import Uncertainty
from lib.frames import LoadedImages, PreparedVolumes
from lib.infers.medsegx import DEEPGROW, VISTA3D, MedSegXInfer
from lib.labels import LabelMap
from lib.model_store import ModelStore
from lib.prefetch import NeighbourPrefetcher
from lib.score_keys import SCORE_KEY
from lib.scoring.medsegx_uncertainty import MedSegXUncertaintyScoring
from lib.settings import AppConfigError, AppSettings
from lib.trainers.medsegx import MedSegXTrain

logger = logging.getLogger(__name__)


class MedSegX(TaskConfig):
    """ConMoAE-SAM box-prompt segmentation; ``path = [pretrained, published]``, last existing wins.

    ``init`` parses ``--conf`` once (:class:`AppSettings`) and loads the model, so a bad option
    or an unusable checkpoint stops the server at start with one line naming it.
    """

    def __init__(self):
        super().__init__()
        self.settings: AppSettings | None = None
        self.label_map: LabelMap | None = None
        self.store: ModelStore | None = None
        self.prefetcher: NeighbourPrefetcher | None = None

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        # main.py parses --conf once and passes it; parse here only when used on its own
        self.settings = kwargs.get("settings") or AppSettings.from_conf(conf, Path(model_dir).parent)
        self.path = [str(path) for path in self.settings.checkpoint_paths]
        self.label_map = LabelMap(self.settings.model_dir, self.settings.labels)
        self.labels = self.label_map.labels
        self.store = ModelStore(self.settings)
        # busy: the app's infer queue (main.py); idle-time prefetch yields to any request in it
        self.prefetcher = NeighbourPrefetcher(self.store, self.settings.prefetch_slices, kwargs.get("busy"))
        try:
            with self.store.use() as loaded:
                logger.info("medsegx model ready: %s (%s on %s)", loaded.version, self.settings.backbone, self.settings.device)
        except (CheckpointError, ValueError) as err:
            raise AppConfigError(f"cannot load the medsegx model: {err}") from None

    def infer(self) -> dict[str, InferTask]:
        """Two entries on one model and cache: what 3D Slicer and OHIF each list (``lib/infers/medsegx.py``)."""
        prepared, loaded = PreparedVolumes(capacity=2), LoadedImages(capacity=1)
        sessions = SessionCache(max_bytes=self.settings.session_cache_mb * 2**20)
        return {
            self.name: MedSegXInfer(self.store, self.label_map, self.settings, prepared, kind=DEEPGROW,
                                    prefetcher=self.prefetcher, loaded_images=loaded, sessions=sessions),
            f"{self.name}_labels": MedSegXInfer(
                self.store, self.label_map, self.settings, prepared, kind=VISTA3D,
                description="MedSegX (ConMoAE-SAM) for OHIF: pick a label, click on it -> mask", prefetcher=self.prefetcher,
                loaded_images=loaded, sessions=sessions),
        }

    def trainer(self) -> TrainTask | None:
        # publishes the last of path ([pretrained, model/medsegx.pth]), which the store then serves
        return MedSegXTrain(self.store, publish_path=self.path[-1], output_dir=Path(self.model_dir) / self.name,
                            app_labels=self.label_map.labels)

    def strategy(self) -> dict[str, Strategy]:
        return {"uncertainty": Uncertainty()}

    def scoring_method(self) -> dict[str, ScoringMethod]:
        return {SCORE_KEY: MedSegXUncertaintyScoring(self.store, self.label_map.labels)}
