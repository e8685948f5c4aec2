"""The MedSegX infer tasks: a box and/or clicks on a slice, or a 3D box, to a label volume.

Two entries of ``/info`` run this task on one shared model, embedding cache and prepared-
volume cache, so the stock MONAI Label 0.8.5 clients use it unmodified (``apps/medsegx/README.md``):

- ``medsegx``, type ``deepgrow``: 3D Slicer's SmartEdit (points + ROI) and OHIF's point
  prompts list it. The result holds **1** on the structure (Slicer imports value 1 into the
  selected segment; OHIF maps any non-zero voxel of a deepgrow result to the chosen label).
- ``medsegx_labels``, type ``vista3d``: OHIF sends the chosen label as ``label_prompt``; the
  result holds that label's value of the ``/info`` label map (uint8 for OHIF's NRRD).

Request params (multipart form field ``params``, JSON), besides MONAI Label's own
(``lib/infers/prompt.py`` validates them):

- ``label``: the structure name (Slicer: the segment's name), or ``label_prompt`` =
  ``[value]`` (OHIF vista3d); neither: ``--conf default_label`` (modality-only context).
  The name picks the ConMoAE context through the MedSegDB taxonomy;
- ``roi``: ``[i_a, i_b, j_a, j_b, k_a, k_b]`` voxel indices (Slicer's ROI layout, pairs in
  any order); ``k_a == k_b`` gives one slice, else 3D propagation through the box;
- ``foreground`` / ``background``: ``[[i, j, k], ...]`` clicks (or ``points`` + ``point_labels``).
  On a volume each click corrects the mask on its own slice and the change is propagated
  (``medsegx.propagation``): a 3D box is segmented first, clicks alone start from the first
  foreground click; the server keeps the last requests (``--conf session_cache_mb``) so a request
  that adds one click costs that click. ``propagate: false`` keeps the clicked slice;
- ``slice``: segment this slice only;
- ``modality``: else DICOM ``Modality``, else detected from intensities (``lib/modality.py``).

The result label has the input's shape and affine (NIfTI for volumes and DICOM series, written
with nibabel; PNG for pictures or another ``result_extension`` by MONAI Label's ``Writer``); the
result JSON adds the label name and its map value, the taxonomy path, the chosen mask's predicted
IoU, the model version and the model's latencies (``latencies.model``, with ``cache_hit`` and
``runtime``: ``openvino`` or ``eager``; for a volume ``prepared_volume_cached`` and
``image_read_again``: its pixels were released once prepared, and another CT window or modality
read the file again).
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

from medsegx.propagation import Click, SessionCache, VolumeSession, segment
from medsegx.taxonomy import resolve
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib import guards
from lib.frames import (
    LoadedImages,
    PreparedVolumes,
    ReleasedVolume,
    file_stamp,
    intensity_signature,
    is_picture,
    loaded_volume_xyz,
    mask_zhw_to_xyz,
    picture_to_rgb,
)
from lib.infers.prompt import Prompt, RequestError, check_required, parse_label, parse_prompt
from lib.labels import LabelMap
from lib.modality import choose_modality, intensity_range
from lib.model_store import ModelStore
from lib.prefetch import NeighbourPrefetcher
from lib.settings import AppSettings

logger = logging.getLogger(__name__)

# Result files: a DICOM series (a folder) has no extension of its own; JPEG would blur labels.
_DEFAULT_EXTENSIONS = {".jpg": ".png", ".jpeg": ".png"}


#: ``/info`` model types: what each stock client lists, and what value the result holds.
DEEPGROW = InferType.DEEPGROW  # Slicer SmartEdit and OHIF point prompts; result value 1
VISTA3D = "vista3d"  # OHIF passes the chosen label (label_prompt); result value = label map value
INFER_KINDS = (DEEPGROW, VISTA3D)


class MedSegXInfer(BasicInferTask):
    """MedSegX (ConMoAE-SAM) box / click annotation on volumes, DICOM series and pictures.

    Args:
        store: the process's model (reloaded when a newer checkpoint is published).
        label_map: the app's label map; its ``labels`` dict is what ``/info`` shows.
        settings: parsed ``--conf``.
        prepared: the prepared-volume cache, shared by every entry of the same model.
        kind: ``deepgrow`` (result value 1) or ``vista3d`` (result value = label value).
        prefetcher: encodes the slices next to each volume request while the server is idle.
        loaded_images: the last loaded images, shared by every entry of the same model.
        sessions: the last propagated requests' state (``medsegx.propagation.SessionCache``), so a
            client's next click costs that click only; shared by every entry of the same model.
    """

    def __init__(self, store: ModelStore, label_map: LabelMap, settings: AppSettings,
                 prepared: PreparedVolumes | None = None, kind: str = DEEPGROW, description: str = "",
                 prefetcher: NeighbourPrefetcher | None = None, loaded_images: LoadedImages | None = None,
                 sessions: SessionCache | None = None):
        if kind not in INFER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(INFER_KINDS)}, got {kind!r}")
        super().__init__(
            path=[str(path) for path in settings.checkpoint_paths],
            network=None,
            type=kind,
            labels=label_map.labels,
            dimension=3,  # Slicer sends `slice` (a RAS offset, a plugin bug) only for dimension 2
            description=description or "MedSegX (ConMoAE-SAM): a box (ROI) or clicks -> mask, on a slice or in 3D",
            config={"propagate": True},  # Slicer and OHIF echo a model's config keys back as params
        )
        self.kind = kind
        self.store = store
        self.label_map = label_map
        self.settings = settings
        self.prepared = prepared if prepared is not None else PreparedVolumes(capacity=2)
        self.prefetcher = prefetcher
        self.loaded_images = loaded_images if loaded_images is not None else LoadedImages()
        self.sessions = sessions if sessions is not None else SessionCache()

    def is_valid(self) -> bool:
        return True  # the embedded LiteMedSAM needs no file; configured files are checked at start

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["backbone"] = self.settings.backbone
        info["runtime"] = self.store.runtime_status()
        return info

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        # the file's own dtype (int16 for CT): MONAI's default float32 copy doubled the largest
        # buffer of a request (a 512 x 512 x 300 CT: 300 MB instead of 150 MB); preparation makes floats per slab
        return [LoadImaged(keys="image", image_only=False, dtype=None)]

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
        image_path = data.get("image_path")
        stamp = file_stamp(image_path) if isinstance(image_path, str) else None
        data["image_stamp"] = stamp
        cached = self.loaded_images.get(stamp)
        if cached is not None:  # the same file as a recent request: its header and pixels passed the checks then
            data.update(cached)
            return data
        data = self._load(data, transforms)
        self.loaded_images.put(stamp, {key: data[key] for key in ("image", "image_meta_dict") if key in data})
        return data

    def _load(self, data: dict[str, Any], transforms) -> dict[str, Any]:
        """MONAI's ``LoadImaged`` on the request's file, checked (header first, then the pixels)."""
        guards.check_image_file(data.get("image_path"), self.settings.max_voxels)  # header only, before loading
        try:
            data = super().run_pre_transforms(data, transforms)
        except Exception as err:  # unreadable / unsupported file: the client's input, not a server fault
            raise RequestError(f"cannot read image {data.get('image_path')}: {type(err).__name__}: {err}") from err
        guards.check_loaded(data["image"])
        return data

    def _reload_volume(self, image_path: str) -> np.ndarray:
        """The ``(X, Y, Z)`` pixels of a volume whose loaded pixels were released, read from its file again."""
        fresh = {"image": image_path, "image_path": image_path}
        image = self._load(fresh, self.pre_transforms(fresh))["image"]
        return loaded_volume_xyz(image.array if isinstance(image, MetaTensor) else image)

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        image = data["image"]
        image_path = data.get("image_path") if isinstance(data.get("image_path"), str) else None
        picture = is_picture(image_path)
        if isinstance(image, ReleasedVolume):  # prepared by an earlier request (LoadedImages.release_pixels)
            array, released, spatial_shape = None, image, image.volume_shape
        else:
            array = image.array if isinstance(image, MetaTensor) else np.asarray(image)
            if not picture and array.ndim == 4 and array.shape[-1] == 1:
                array = array[..., 0]
            if not picture and array.ndim == 2:
                array = array[..., None]  # a 2D NIfTI / DICOM frame: a one-slice volume
            if (picture and array.ndim not in (2, 3)) or (not picture and array.ndim != 3):
                raise RequestError(f"expected a 3D volume or a 2D picture, the image has shape {tuple(image.shape)}")
            spatial_shape = array.shape[:2] if picture else array.shape
            released = None if picture else ReleasedVolume(
                tuple(image.shape), array.shape, image.affine if isinstance(image, MetaTensor) else None,
                intensity_range(array))

        label_name = parse_label(data, self.label_map.labels, self.settings.default_label)
        prompt = parse_prompt(data, spatial_shape, propagate=_flag(data.get("propagate", True)))
        try:
            modality = choose_modality(data.get("modality"), image_path,
                                       array if released is None else released.intensity_range)
        except ValueError as err:
            raise RequestError(str(err)) from None
        context = resolve(label_name, modality.modality)
        reread = False
        if not picture:
            key = _image_key(image_path, intensity_signature(modality.modality, context))
            if array is None and key not in self.prepared:  # another window or modality: read the file again
                array, reread = self._reload_volume(image_path), True
            # the prepared volume serves this image from now on: only its header stays (80 MiB less for a
            # 512 x 512 x 160 int16 CT); this request's pixels go when it returns
            self.loaded_images.release_pixels(data.get("image_stamp"), released)
            data["image"] = released

        with self.store.use() as loaded:
            try:
                if picture:
                    _, label_xyz, model_json = self._predict_picture(loaded.predictor, array, prompt, context, image_path)
                else:
                    mask_zhw, model_json, neighbourhood = self._predict_volume(
                        loaded.predictor, array, prompt, context, modality.modality, key, image_path, loaded.version
                    )
                    z_first, z_last = neighbourhood[1:3]  # no voxel of the mask lies outside
                    label_xyz = mask_zhw_to_xyz(mask_zhw[z_first:z_last + 1])
                    model_json["model_latencies"]["image_read_again"] = reread
            except ValueError as err:  # the predictor validates prompts (e.g. a click outside the image)
                raise RequestError(str(err)) from None
        if not picture and self.prefetcher is not None:  # idle time: encode the neighbouring slices
            prepared, z_first, z_last, key = neighbourhood
            self.prefetcher.schedule(prepared, z_first, z_last, context, key, loaded)
        label_value, label_added = self.label_map.value_of(label_name) if label_name else (None, False)
        # a failed request adds no name; deepgrow clients import value 1 into the chosen segment
        voxel_value = label_value if self.kind == VISTA3D and label_value is not None else 1

        dtype = np.uint8 if voxel_value <= np.iinfo(np.uint8).max else np.uint16
        # A NIfTI result is built in Fortran order, NIfTI's on-disk order (nibabel wrote a C-order
        # 512 x 512 x 160 label through a transposing copy: 0.28 s vs 0.06 s), which is also the
        # predictor's (Z, H, W) mask's memory layout; ITK's writers (NRRD, DICOM SEG ...) took the C order
        # 0.19 s and the Fortran one 0.5 s. A volume's label is filled on the segmented slices only
        # (through a boolean mask over the whole volume it read every voxel: ~0.2 s of a cached 2D box).
        order = "F" if _result_extension(data)[1] in (".nii", ".nii.gz") else "C"
        label = np.zeros(spatial_shape, dtype=dtype, order=order)
        target = label if picture else label[:, :, z_first:z_last + 1]
        np.multiply(label_xyz, dtype(voxel_value), out=target, casting="unsafe")
        if not picture and len(released.shape) == 2:
            label = label[..., 0]  # back to the input's 2D shape
        if dtype != np.uint8 and str(data.get("result_dtype", "")).lower() == "uint8":
            data["result_dtype"] = "uint16"  # a uint8 result would wrap the label value
        affine = released.affine if released is not None else image.affine if isinstance(image, MetaTensor) else None
        data["pred"] = MetaTensor(label, affine=affine) if affine is not None else label

        data["result"] = {
            "label": label_name,
            "label_index": label_value,
            "label_added": label_added,
            "result_value": int(voxel_value),
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
        prediction = _predict_slice(predictor, image_hw, prompt, context, _image_key(image_path, "picture"), 0)
        return prediction, np.swapaxes(prediction.mask, 0, 1), _prediction_json(prediction)

    def _predict_volume(self, predictor, array, prompt: Prompt, context, modality: str, key, image_path,
                        version=None):
        """(mask (Z, H, W), model JSON, (prepared volume, first and last slice segmented, cache key)).

        ``array``: the ``(X, Y, Z)`` pixels, or ``None`` when they were released (the prepared volume
        ``key`` is then cached, else the file is read again).
        """
        source = array if array is not None else lambda: self._reload_volume(image_path)
        prepared, prepared_hit = self.prepared.get(key, source, modality, context)
        depth, height, width = prepared.shape
        if not prompt.is_3d:
            z = prompt.slice_index
            prediction = _predict_slice(predictor, prepared[z], prompt, context, key, z)
            mask = np.zeros((depth, height, width), dtype=bool)
            mask[z] = prediction.mask
            model_json = _prediction_json(prediction)
            segmented = (z, z)
        else:
            prediction = self._segment_volume(predictor, prepared, prompt, context, key, version)
            mask = prediction.mask
            model_json = _prediction_3d_json(prediction)
            masked = np.flatnonzero(mask.any(axis=(1, 2)))
            ends = [*prediction.slices[:1], *prediction.slices[-1:], *masked[:1], *masked[-1:]] or [prompt.slice_index]
            segmented = (int(min(ends)), int(max(ends)))
        model_json["model_latencies"]["prepared_volume_cached"] = prepared_hit
        return mask, model_json, (prepared, *segmented, key)

    def _segment_volume(self, predictor, prepared, prompt: Prompt, context, key, version):
        """A propagated request through ``medsegx.propagation.segment``: a 3D box, then every click on its
        own slice, resumed from the kept session of the same image, structure, box and model."""
        clicks = [Click(x, y, z, is_foreground) for x, y, z, is_foreground in prompt.clicks]
        if prompt.box_slices is not None:
            box3d = (*prompt.box_xyxy, *prompt.box_slices)
            prediction = segment(predictor, prepared, context, key=key, box3d=box3d, clicks=clicks,
                                 cache=self.sessions, cache_key=(key, context.indices, version)).result()
        elif prompt.box_xyxy is not None:  # a one-slice box with propagated clicks: it starts on its slice
            session = VolumeSession(predictor, prepared, context, key, prompt.z_range)
            session.add_box(prompt.box_xyxy, start_slice=prompt.slice_index)
            for click in clicks:
                session.add_click(click)
            prediction = session.result()
        else:
            prediction = segment(predictor, prepared, context, key=key, clicks=clicks, z_range=prompt.z_range,
                                 cache=self.sessions,
                                 cache_key=(key, context.indices, version)).result()
        return prediction

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        """NIfTI results are written with nibabel; other formats by MONAI Label's ``Writer``.

        MONAI Label's ``Writer`` goes through ITK, whose first ``imwrite`` in a process loads
        ITK's lazily imported IO modules: 2 s on a quiet 2-core machine, 6.8 s under load, for a
        160 x 160 x 24 label that nibabel writes in a few milliseconds (gzip level 1). The
        geometry is the same: the image's affine as both qform and sform (code 1, scanner),
        millimetres, as ITK writes it.
        """
        extension, chosen = _result_extension(data, extension)
        if chosen in (".nii", ".nii.gz") and isinstance(data.get("pred"), MetaTensor | np.ndarray):
            return _write_nifti(data, chosen, dtype or data.get("result_dtype"))
        return super().writer(data, extension=extension, dtype=dtype)


def _result_extension(data: dict[str, Any], extension: str | None = None) -> tuple[str | None, str | None]:
    """(the extension to pass MONAI Label's ``Writer``, the result's format) for a request."""
    image_path = data.get("image_path")
    if extension is None and not data.get("result_extension") and isinstance(image_path, str):
        suffix = Path(image_path).suffix.lower()
        if os.path.isdir(image_path) or suffix in (".dcm", ".dicom"):
            extension = ".nii.gz"
        elif suffix in _DEFAULT_EXTENSIONS:
            extension = _DEFAULT_EXTENSIONS[suffix]
    chosen = extension or data.get("result_extension") or (
        _nifti_suffix(image_path) if isinstance(image_path, str) else None)
    return extension, chosen


def _nifti_suffix(path: str) -> str | None:
    name = path.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None


def _write_nifti(data: dict[str, Any], extension: str, dtype) -> tuple[str, dict]:
    """The label ``data["pred"]`` on the image's grid as a NIfTI file; (path, result JSON)."""
    import tempfile

    import nibabel as nib

    label = data["pred"]
    # ``MetaTensor.array`` copied the Fortran-order label into C order (0.18 s for 512 x 512 x 160), which
    # nibabel then transposed back; the tensor's own numpy view keeps the order
    array = label.as_tensor().detach().cpu().numpy() if isinstance(label, MetaTensor) else np.asarray(label)
    meta = data.get("image_meta_dict") or {}
    affine = meta.get("affine")
    if affine is None:
        image = data.get("image")
        affine = image.affine if isinstance(image, MetaTensor) else label.affine if isinstance(label, MetaTensor) else None
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if dtype:
        array = array.astype(np.dtype(str(dtype)), copy=False)
    image = nib.Nifti1Image(array, affine)  # a Fortran-order array is written without a copy
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with tempfile.NamedTemporaryFile(suffix=extension, delete=False) as handle:
        path = handle.name
    nib.save(image, path)
    return path, data.get("result", {})


def _image_key(image_path: str | None, signature: str):
    """Predictor cache key of an image: its file (and version) plus how it was prepared."""
    if not image_path:
        return None  # in-memory image: the predictor hashes the pixels
    try:
        mtime = os.stat(image_path).st_mtime_ns
    except OSError:
        mtime = 0
    return (image_path, mtime, signature)


def _flag(value: Any) -> bool:
    """A client's boolean: JSON true/false, or a string from Slicer's options table."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def _predict_slice(predictor, image, prompt: Prompt, context, key, slice_index: int):
    """One slice: a box (+ clicks), or clicks alone."""
    if prompt.box_xyxy is None:
        return predictor.predict_clicks(image, _point_rows(prompt), context, key=key, slice_index=slice_index)
    return predictor.predict(image, prompt.box_xyxy, context, points=_point_rows(prompt), key=key,
                             slice_index=slice_index)


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
            "runtime": prediction.runtime,
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
            # no encoder pass in this request (a resumed session may decode no slice at all)
            "cache_hit": int(timings.get("encoder_passes", 0)) == 0,
            "runtime": prediction.middle.runtime,
        },
    }
