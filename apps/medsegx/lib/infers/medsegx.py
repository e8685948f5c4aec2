"""The ``medsegx`` infer task: a box (+ points) on a slice, or a 3D box, to a label volume.

Request params (multipart form field ``params``, JSON), besides MONAI Label's own:

- ``label`` (required): the structure name chosen in the client; picks the label value from
  the app's label map (a new name gets the next free value) and the MedSegX context;
- ``roi`` (required): ``[x0, y0, x1, y1, z0, z1]`` voxel indices of the image as MONAI loads it
  (``lib/infers/prompt.py``); ``z0 == z1`` or ``slice`` gives one slice, else 3D propagation;
- ``slice``: segment this slice only (a 4-number ``roi`` then suffices);
- ``foreground`` / ``background``: ``[x, y]`` or ``[x, y, z]`` clicks (2D requests);
- ``modality``: else DICOM ``Modality``, else detected from intensities (``lib/modality.py``).

The result label has the input's shape and affine (written by MONAI Label's ``Writer``: NIfTI
for volumes and DICOM series, PNG for pictures, or ``result_extension``); the result JSON adds
the label value used, the taxonomy path, the chosen mask's predicted IoU, the model version
and the model's latencies (``latencies.model``, with ``cache_hit``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from medsegx.taxonomy import resolve
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.frames import (
    PreparedVolumes,
    intensity_signature,
    is_picture,
    mask_zhw_to_xyz,
    picture_to_rgb,
)
from lib.infers.prompt import Prompt, RequestError, check_required, parse_label, parse_prompt
from lib.labels import LabelMap
from lib.modality import choose_modality
from lib.model_store import ModelStore
from lib.settings import AppSettings

logger = logging.getLogger(__name__)

# Result files: a DICOM series (a folder) has no extension of its own; JPEG would blur labels.
_DEFAULT_EXTENSIONS = {".jpg": ".png", ".jpeg": ".png"}


class MedSegXInfer(BasicInferTask):
    """MedSegX (ConMoAE-SAM) box-prompt annotation on volumes, DICOM series and pictures.

    Args:
        store: the process's model (reloaded when a newer checkpoint is published).
        label_map: the app's label map; its ``labels`` dict is what ``/info`` shows.
        settings: parsed ``--conf``.
    """

    def __init__(self, store: ModelStore, label_map: LabelMap, settings: AppSettings, description: str = ""):
        super().__init__(
            path=[str(path) for path in settings.checkpoint_paths],
            network=None,
            type=InferType.ANNOTATION,
            labels=label_map.labels,
            dimension=3,
            description=description or "MedSegX (ConMoAE-SAM): box prompt -> mask, on a slice or propagated in 3D",
            config={"backbone": settings.backbone, "cache_size": settings.cache_size},
        )
        self.store = store
        self.label_map = label_map
        self.settings = settings
        self.prepared = PreparedVolumes(capacity=2)

    def is_valid(self) -> bool:
        return True  # the embedded LiteMedSAM needs no file; configured files are checked at start

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["backbone"] = self.settings.backbone
        return info

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [LoadImaged(keys="image", image_only=False)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def inferer(self, data=None):
        return None

    def __call__(self, request, callbacks=None):
        check_required(request)  # before reading the image
        result_file, result_json = super().__call__(request, callbacks)
        model_latencies = result_json.pop("model_latencies", None)
        if model_latencies is not None:
            result_json["latencies"]["model"] = model_latencies
            result_json["latencies"]["cache_hit"] = model_latencies["cache_hit"]
        return result_file, result_json

    def run_pre_transforms(self, data: dict[str, Any], transforms):
        try:
            return super().run_pre_transforms(data, transforms)
        except Exception as err:  # unreadable / unsupported file: the client's input, not a server fault
            raise RequestError(f"cannot read image {data.get('image_path')}: {type(err).__name__}: {err}") from err

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        image = data["image"]
        image_path = data.get("image_path") if isinstance(data.get("image_path"), str) else None
        array = image.array if isinstance(image, MetaTensor) else np.asarray(image)
        picture = is_picture(image_path)
        if not picture and array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if not picture and array.ndim == 2:
            array = array[..., None]  # a 2D NIfTI / DICOM frame: a one-slice volume
        if (picture and array.ndim not in (2, 3)) or (not picture and array.ndim != 3):
            raise RequestError(f"expected a 3D volume or a 2D picture, the image has shape {tuple(image.shape)}")
        spatial_shape = array.shape[:2] if picture else array.shape

        label_name = parse_label(data)
        prompt = parse_prompt(data, spatial_shape)
        try:
            modality = choose_modality(data.get("modality"), image_path, array)
        except ValueError as err:
            raise RequestError(str(err)) from None
        context = resolve(label_name, modality.modality)

        with self.store.use() as loaded:
            try:
                if picture:
                    _, label_xyz, model_json = self._predict_picture(loaded.predictor, array, prompt, context, image_path)
                else:
                    _, mask_zhw, model_json = self._predict_volume(
                        loaded.predictor, array, prompt, context, modality.modality, image_path
                    )
                    label_xyz = mask_zhw_to_xyz(mask_zhw)
            except ValueError as err:  # the predictor validates prompts (e.g. a click outside the image)
                raise RequestError(str(err)) from None
        label_value, label_added = self.label_map.value_of(label_name)  # a failed request adds no name

        dtype = np.uint8 if label_value <= np.iinfo(np.uint8).max else np.uint16
        label = np.zeros(spatial_shape, dtype=dtype)
        label[label_xyz] = label_value
        if not picture and len(image.shape) == 2:
            label = label[..., 0]  # back to the input's 2D shape
        if dtype != np.uint8 and str(data.get("result_dtype", "")).lower() == "uint8":
            data["result_dtype"] = "uint16"  # a uint8 result would wrap the label value
        affine = image.affine if isinstance(image, MetaTensor) else None
        data["pred"] = MetaTensor(label, affine=affine) if affine is not None else label

        data["result"] = {
            "label": label_name,
            "label_index": label_value,
            "label_added": label_added,
            **prompt.as_json(),
            "modality": modality.modality,
            "modality_source": modality.source,
            "taxonomy_path": context.path,
            "task": context.task,
            "context": list(context.indices),
            "voxels": int(np.count_nonzero(label_xyz)),
            "model_version": loaded.version,
            "model_checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
            "backbone": self.settings.backbone,
            **model_json,
        }
        if loaded.reload_error:
            data["result"]["model_reload_error"] = loaded.reload_error
        return data

    def _predict_picture(self, predictor, array, prompt: Prompt, context, image_path):
        image_hw = picture_to_rgb(array)
        points = _point_rows(prompt)
        key = _image_key(image_path, "picture")
        prediction = predictor.predict(image_hw, prompt.box_xyxy, context, points=points, key=key, slice_index=0)
        return prediction, np.swapaxes(prediction.mask, 0, 1), _prediction_json(prediction)

    def _predict_volume(self, predictor, array, prompt: Prompt, context, modality: str, image_path):
        signature = intensity_signature(modality, context)
        key = _image_key(image_path, signature)
        prepared, prepared_hit = self.prepared.get(key, array, modality, context)
        depth, height, width = prepared.shape
        if not prompt.is_3d:
            z = prompt.slice_index
            prediction = predictor.predict(
                prepared[z], prompt.box_xyxy, context, points=_point_rows(prompt), key=key, slice_index=z
            )
            mask = np.zeros((depth, height, width), dtype=bool)
            mask[z] = prediction.mask
            model_json = _prediction_json(prediction)
        else:
            x0, y0, x1, y1 = prompt.box_xyxy
            prediction = predictor.predict_3d(prepared, (x0, y0, x1, y1, *prompt.z_range), context, key=key)
            mask = prediction.mask
            model_json = _prediction_3d_json(prediction)
        model_json["model_latencies"]["prepared_volume_cached"] = prepared_hit
        return prediction, mask, model_json

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        image_path = data.get("image_path")
        if extension is None and not data.get("result_extension") and isinstance(image_path, str):
            suffix = Path(image_path).suffix.lower()
            if os.path.isdir(image_path) or suffix in (".dcm", ".dicom"):
                extension = ".nii.gz"
            elif suffix in _DEFAULT_EXTENSIONS:
                extension = _DEFAULT_EXTENSIONS[suffix]
        return super().writer(data, extension=extension, dtype=dtype)


def _image_key(image_path: str | None, signature: str):
    """Predictor cache key of an image: its file (and version) plus how it was prepared."""
    if not image_path:
        return None  # in-memory image: the predictor hashes the pixels
    try:
        mtime = os.stat(image_path).st_mtime_ns
    except OSError:
        mtime = 0
    return (image_path, mtime, signature)


def _point_rows(prompt: Prompt) -> np.ndarray | None:
    rows = [(x, y, 1) for x, y in prompt.foreground] + [(x, y, 0) for x, y in prompt.background]
    return np.asarray(rows, dtype=np.float64) if rows else None


def _prediction_json(prediction) -> dict[str, Any]:
    return {
        "iou": round(float(prediction.score), 4),
        "iou_all": [round(float(v), 4) for v in prediction.iou],
        "chosen_mask": int(prediction.chosen),
        "model_latencies": {
            "encode": round(prediction.encode_ms / 1000.0, 4),
            "decode": round(prediction.decode_ms / 1000.0, 4),
            "post": round(prediction.post_ms / 1000.0, 4),
            "cache_hit": bool(prediction.cache_hit),
        },
    }


def _prediction_3d_json(prediction) -> dict[str, Any]:
    timings = prediction.timings
    segmented = [z for z in prediction.slices if np.isfinite(prediction.scores[z])]
    return {
        "iou": round(float(prediction.middle.score), 4),
        "iou_mean": round(float(np.nanmean(prediction.scores[segmented])), 4) if segmented else None,
        "chosen_mask": int(prediction.middle.chosen),
        "middle_slice": int(prediction.middle_slice),
        "slices": [int(min(prediction.slices)), int(max(prediction.slices))] if prediction.slices else [],
        "model_latencies": {
            "encode": round(timings.get("encode_ms", 0.0) / 1000.0, 4),
            "decode": round(timings.get("decode_ms", 0.0) / 1000.0, 4),
            "post": round(timings.get("post_ms", 0.0) / 1000.0, 4),
            "total": round(timings.get("total_ms", 0.0) / 1000.0, 4),
            "slices": len(prediction.slices),
            "cache_hits": int(timings.get("cache_hits", 0)),
            "cache_hit": int(timings.get("cache_hits", 0)) == len(prediction.slices) and bool(prediction.slices),
        },
    }
