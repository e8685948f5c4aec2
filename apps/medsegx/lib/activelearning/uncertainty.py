"""Active-learning strategy ``uncertainty``: the unlabelled image the model is least sure about.

Reads the scores the ``medsegx_uncertainty`` scoring task stores in the datastore's image
info (``lib/scoring/medsegx_uncertainty.py``; MONAI Label runs scoring in the background at
start-up, after training and after each next-sample request). The strategy itself never
runs the model: MONAI Label calls strategies inside the server's request loop.

Order: the highest score among unlabelled images scored with the model version that scored
most recently; then older scores; unscored images come last (in name order), so before any
scoring the strategy answers like ``first``, and says so in the result (``score: null``).
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.score_keys import MODEL_KEY, SCORE_KEY, TS_KEY

logger = logging.getLogger(__name__)


class Uncertainty(Strategy):
    """Pick the unlabelled image with the highest ``medsegx_uncertainty`` score."""

    def __init__(self, key: str = SCORE_KEY):
        super().__init__("Unlabelled image the MedSegX model is least sure about (scoring: medsegx_uncertainty)")
        self.key = key

    def __call__(self, request, datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        infos = {image: datastore.get_image_info(image) or {} for image in images}
        scored = {image: info for image, info in infos.items() if isinstance(info.get(self.key), (int, float))}
        if not scored:
            image = sorted(images)[0]
            logger.warning("uncertainty: no unlabelled image is scored yet (POST /scoring/medsegx_uncertainty); "
                           "returning the first one: %s", image)
            return {"id": image, "score": None, "score_model_version": None}
        latest = max(scored.values(), key=lambda info: info.get(TS_KEY, 0)).get(MODEL_KEY)
        image = max(scored, key=lambda name: (scored[name].get(MODEL_KEY) == latest, scored[name][self.key], name))
        info = scored[image]
        logger.info("uncertainty: %s (score %.5f, model %s; %d of %d unlabelled images scored)", image, info[self.key],
                    info.get(MODEL_KEY), len(scored), len(images))
        return {"id": image, "score": info[self.key], "score_model_version": info.get(MODEL_KEY)}
