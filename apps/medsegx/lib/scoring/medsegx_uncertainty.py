"""Scoring task ``medsegx_uncertainty``: how unsure the served model is about each unlabelled image.

A SAM-type model answers a prompt, and an unlabelled image has none, so the prompts come
from what annotators label in this datastore: for every named structure of the labelled
images (``lib/labelled_slices.py`` reads them as the train task does), the slice where it
is largest, as a fraction of the volume's depth, and its bounding box, as fractions of the
slice's width and height ("where this structure usually is"). An unlabelled image of the
same modality is prompted with those boxes at those relative slices (at most
``max_prompts``, largest first), under each structure's own ConMoAE context. With no
labelled structure of its modality, the prompt is the bounding box of the non-zero
(windowed) pixels of the middle slice under an unknown target.

Each prompt is answered by an ensemble: the three multimask outputs, times ``mc_samples``
Monte-Carlo dropout passes through the ConMoAE adapters when the adapters have been trained
(fresh adapters output exactly zero, so dropout there changes nothing and one pass is
taken). The score is the ensemble's mean mutual information inside the box
(``medsegx.metrics.mask_uncertainty``, in nats, 0..log 2), averaged over the prompts:
high when the masks disagree.

Stored in the datastore's image info (as MONAI Label's epistemic scoring does):
``medsegx_uncertainty`` (score), ``medsegx_uncertainty_model`` (the model version it was
computed with), ``medsegx_uncertainty_ts`` and ``medsegx_uncertainty_prompts``. An image already
scored with the current model version is skipped unless the request says ``force``.

The task runs the served model (the infer task's model store) under the store's lock, so
Monte-Carlo dropout, a model-wide switch, is never on while a request runs; in MONAI Label's
background scoring process that is a model of its own anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medsegx.items import mask_box
from medsegx.metrics import mask_uncertainty
from medsegx.modeling import MedSegXModel
from medsegx.predictor import Predictor
from medsegx.taxonomy import resolve
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.background import BACKGROUND_NICE, limit_background_cpu
from lib.labelled_slices import BuildReport, LoadedImage, SliceSetBuilder, labelled_volumes, load_image
from lib.model_store import ModelStore
from lib.score_keys import MODEL_KEY, PROMPTS_KEY, SCORE_KEY, TS_KEY

logger = logging.getLogger(__name__)

FALLBACK_TARGET = "foreground"


@dataclass(frozen=True)
class AtlasPrompt:
    """Where a structure usually is: a relative slice and a relative box ``(x0, y0, x1, y1)`` in 0..1."""

    name: str
    modality: str
    slice_fraction: float
    box_fraction: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box_fraction
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def build_atlas(builder: SliceSetBuilder, entries: Sequence[Mapping[str, Any]],
                max_volumes: int = 8) -> list[AtlasPrompt]:
    """One ``AtlasPrompt`` per (structure name, modality), medians over the labelled images."""
    found: dict[tuple[str, str], list[tuple[float, tuple[float, ...]]]] = {}
    report = BuildReport(purpose="uncertainty atlas")
    for entry in list(entries)[:max_volumes]:
        labelled = builder.read(entry, report)
        if labelled is None:
            continue
        depth, height, width = labelled.labels.shape
        for value, (name, slices) in labelled.structures.items():
            areas = [(labelled.labels[z] == value).sum() for z in slices]
            z = int(slices[int(np.argmax(areas))])
            x0, y0, x1, y1 = mask_box(labelled.labels[z] == value)
            box = (x0 / max(width - 1, 1), y0 / max(height - 1, 1), x1 / max(width - 1, 1), y1 / max(height - 1, 1))
            found.setdefault((name, labelled.image.modality), []).append((z / max(depth - 1, 1), box))
    atlas = []
    for (name, modality), places in found.items():
        fractions = np.array([p[0] for p in places])
        boxes = np.array([p[1] for p in places])
        atlas.append(AtlasPrompt(name, modality, float(np.median(fractions)),
                                 tuple(float(v) for v in np.median(boxes, axis=0))))
    return atlas


def adapters_trained(model: MedSegXModel) -> bool:
    """Whether any adapter Up layer is non-zero (fresh ConMoAE adapters output exactly 0)."""
    return any(bool(torch.any(up.weight != 0)) or bool(torch.any(up.bias != 0))
               for block in model.conmoae_blocks for up in block.adapter_up)


class MedSegXUncertaintyScoring(ScoringMethod):
    """Score every unlabelled image by mask disagreement (+ MC dropout); see the module doc.

    Args:
        store: the process's model store: scoring runs the model it serves (under its lock,
            through a predictor without an embedding cache, so the serving cache never holds
            a dropout-perturbed embedding).
        app_labels: the app's label map (names of unnamed label values, as in training).
        mc_samples: dropout passes per prompt once the adapters are trained.
        max_prompts: prompts per image.
        num_threads, nice: CPU bounds in MONAI Label's background process.

    Request keys: ``force`` (rescore all), ``mc_samples``, ``max_prompts``, ``max_samples``
    (images per run, 0 = all), ``num_threads``, ``nice``.
    """

    def __init__(self, store: ModelStore, app_labels: Mapping[str, int] | None = None, mc_samples: int = 2,
                 max_prompts: int = 3, num_threads: int = 1, nice: int = BACKGROUND_NICE):
        super().__init__("MedSegX uncertainty of unlabelled images: disagreement of the three masks "
                         "(+ MC dropout through the adapters) on atlas box prompts")
        self.store = store
        self.app_labels = dict(app_labels or {})
        self.mc_samples = mc_samples
        self.max_prompts = max_prompts
        self.num_threads = num_threads
        self.nice = nice

    def info(self) -> dict[str, Any]:
        return {**super().info(), "key": SCORE_KEY, "mc_samples": self.mc_samples, "max_prompts": self.max_prompts}

    def __call__(self, request, datastore: Datastore):
        start = time.time()
        limit_background_cpu(int(request.get("num_threads", self.num_threads)), int(request.get("nice", self.nice)))
        force = bool(request.get("force", False))
        mc_samples = max(1, int(request.get("mc_samples", self.mc_samples)))
        max_prompts = max(1, int(request.get("max_prompts", self.max_prompts)))
        max_samples = int(request.get("max_samples", 0))

        unlabelled = sorted(datastore.get_unlabeled_images())
        with self.store.use() as loaded:
            version = loaded.version
            todo = [image_id for image_id in unlabelled
                    if force or (datastore.get_image_info(image_id) or {}).get(MODEL_KEY) != version]
            if max_samples > 0:
                todo = todo[:max_samples]
            summary = {"total": len(unlabelled), "executed": 0, "skipped": len(unlabelled) - len(todo), "failed": 0,
                       "model_version": version}
            if not todo:
                logger.info("medsegx uncertainty: nothing to score (%s)", summary)
                return summary

            builder = SliceSetBuilder(self.app_labels)
            atlas = build_atlas(builder, labelled_volumes(datastore))
            model = loaded.predictor.model
            predictor = Predictor(model, cache_size=0)
            passes = mc_samples if adapters_trained(model) else 1
            logger.info("medsegx uncertainty: model %s, %d image(s), %d atlas structure(s), %d pass(es) per prompt",
                        version, len(todo), len(atlas), passes)
            model.set_mc_dropout(passes > 1)
            try:
                for image_id in todo:
                    try:
                        score, prompts = score_image(predictor, builder, datastore.get_image_uri(image_id), atlas,
                                                     max_prompts, passes)
                    except Exception as err:  # an unreadable image must not stop the others
                        logger.warning("medsegx uncertainty: skipping %s: %s: %s", image_id, type(err).__name__, err)
                        summary["failed"] += 1
                        continue
                    datastore.update_image_info(image_id, {SCORE_KEY: score, MODEL_KEY: version,
                                                           TS_KEY: int(time.time()), PROMPTS_KEY: prompts})
                    summary["executed"] += 1
                    logger.info("medsegx uncertainty: %s = %.5f (%s)", image_id, score,
                                ", ".join(f"{p['name']}@{p['slice']}" for p in prompts))
            finally:
                model.set_mc_dropout(False)
        summary["latency"] = round(time.time() - start, 3)
        logger.info("medsegx uncertainty: %s", summary)
        return summary


def atlas_prompts(image: LoadedImage, builder: SliceSetBuilder, atlas: Sequence[AtlasPrompt],
                  max_prompts: int) -> list[tuple[str, int, tuple[float, float, float, float]]]:
    """``(name, slice, inclusive pixel box)`` prompts for an image: the atlas, else its foreground."""
    height, width = image.size_hw
    depth = image.depth
    candidates = sorted((p for p in atlas if p.modality == image.modality), key=lambda p: p.area, reverse=True)
    prompts = []
    for prompt in candidates[:max_prompts]:
        x0, y0, x1, y1 = prompt.box_fraction
        prompts.append((prompt.name, int(round(prompt.slice_fraction * (depth - 1))),
                        (x0 * (width - 1), y0 * (height - 1), x1 * (width - 1), y1 * (height - 1))))
    if not prompts:
        z = depth // 2
        pixels = builder.prepared_stack(image, resolve(FALLBACK_TARGET, image.modality))[z]
        foreground = pixels.any(axis=-1) if pixels.ndim == 3 else pixels > 0
        box = mask_box(foreground) if foreground.any() else (0, 0, width - 1, height - 1)
        prompts.append((FALLBACK_TARGET, z, tuple(float(v) for v in box)))
    return prompts


def score_image(predictor: Predictor, builder: SliceSetBuilder, image_path: str, atlas: Sequence[AtlasPrompt],
                max_prompts: int, passes: int) -> tuple[float, list[dict]]:
    """Mean prompt uncertainty of one image, and the prompts used (stored in the image info).

    Each prompt goes through ``Predictor.predict`` (the infer task's preparation and box
    mapping) ``passes`` times; the ensemble is the three output masks of every pass.
    """
    image = load_image(image_path)
    scores, used = [], []
    for name, z, box in atlas_prompts(image, builder, atlas, max_prompts):
        context = resolve(name, image.modality)
        pixels = builder.prepared_stack(image, context)[z]
        predictions = [predictor.predict(pixels, box, context) for _ in range(passes)]
        probabilities = torch.sigmoid(torch.from_numpy(np.stack([p.logits for p in predictions])))
        x0, y0, x1, y1 = predictions[0].box_model.tolist()
        region = torch.zeros(probabilities.shape[-2:], dtype=torch.bool)
        region[int(y0): int(np.ceil(y1)) + 1, int(x0): int(np.ceil(x1)) + 1] = True
        score = mask_uncertainty(probabilities, region)
        scores.append(score)
        used.append({"name": name, "slice": z, "box": [round(v, 1) for v in box], "score": round(score, 6)})
    return float(np.mean(scores)), used
