"""The fine-tuning set: the datastore's final labels -> per-structure 2D slice samples.

Every image with a ``final`` label is read exactly as the infer task reads it (MONAI's
``LoadImage``; ``lib/frames.py`` for the axes; ``PreparedVolumes`` / ``picture_to_rgb``
for the intensities; ``lib/modality.py`` for the modality), so a training slice is the
slice the predictor would be given. Each label value is a structure of its own (a
multi-label file is split per structure); its name and the image's modality resolve to the
ConMoAE context with ``medsegx.taxonomy.resolve``.

**Label names** of a label value, first source that names it:

1. the label's info in the datastore (what the client sent with ``PUT /datastore/label``
   as ``params``): ``{"label_info": [{"name": "liver", "idx": 1}, ...]}`` (MONAI Label's
   Slicer client) or ``{"label_names": {"liver": 1}}``;
2. a JSON sidecar ``<image id>_labels.json`` next to the label file or next to the image
   (the sample data's ``ct_phantom_labels.json``): ``{"liver": 1, ...}`` or ``{"1": "liver"}``,
   optionally with ``"modality": "CT"``;
3. the app's label map (``/info`` labels; what the infer task writes), with a warning,
   since a file written by another tool may use other values.

A value no source names is skipped with a warning.

**Modality**: the label info's ``"modality"``, else the image info's, else the sidecar's,
else the DICOM tag, else the intensities (``lib/modality.py``; a PNG comes out as MRI).

Unreadable label or image files, labels whose shape differs from the image's, empty labels
and structures too small on every slice are skipped with a warning, never raised: one bad
file must not stop the fine-tuning of the others.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsegx.budget import FinetuneBudget, split_for_validation
from medsegx.slices import MIN_STRUCTURE_PIXELS, SliceSample, evenly_spaced, structure_slices
from medsegx.taxonomy import resolve

from lib.modality import choose_modality
from lib.frames import (
    PreparedVolumes,
    intensity_signature,
    is_picture,
    loaded_volume_xyz,
    picture_to_rgb,
    volume_to_zhw,
)

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = "_labels.json"
#: Keys of a label JSON sidecar that are not label names.
_SIDECAR_RESERVED = frozenset({"modality", "labels", "label_info", "label_names"})


# -- label names (MONAI Label's label info, JSON sidecars) ----------------------------------

def parse_label_names(value: Any) -> dict[int, str]:
    """Label value -> structure name, from any of the label-map spellings in use.

    Accepted:

    - ``{"liver": 1, "spleen": 2}`` (name -> value; the sample data's sidecars, the app's
      label map);
    - ``{"1": "liver", "2": "spleen"}`` (value -> name);
    - ``[{"name": "liver", "idx": 1}, ...]`` (MONAI Label's Slicer client sends this as the
      ``label_info`` of a saved label; ``"value"`` / ``"index"`` are read as ``"idx"``);
    - a dict holding one of the above under ``"label_info"``, ``"label_names"`` or ``"labels"``.

    The value 0 (background) and entries that are not (name, positive integer) pairs are
    ignored.

    Returns:
        ``{value: name}``, empty when nothing usable was found.
    """
    if isinstance(value, Mapping):
        for key in ("label_info", "label_names", "labels"):
            if key in value:
                return parse_label_names(value[key])
        names: dict[int, str] = {}
        for key, item in value.items():
            if key in _SIDECAR_RESERVED:
                continue
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                label_value, name = int(item), str(key)
            elif isinstance(item, str) and str(key).strip().isdigit():
                label_value, name = int(str(key).strip()), item
            else:
                continue
            if label_value > 0 and name.strip():
                names[label_value] = name.strip()
        return names
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        names = {}
        for entry in value:
            if not isinstance(entry, Mapping) or "name" not in entry:
                continue
            raw = next((entry[k] for k in ("idx", "value", "index") if k in entry), None)
            try:
                label_value = int(raw)
            except (TypeError, ValueError):
                continue
            if label_value > 0 and str(entry["name"]).strip():
                names[label_value] = str(entry["name"]).strip()
        return names
    return {}


def read_label_sidecar(candidates: Sequence[str | os.PathLike]) -> tuple[dict[int, str], str | None, Path | None]:
    """Read the first existing label JSON sidecar among ``candidates``.

    A sidecar is a JSON file in any ``parse_label_names`` spelling, optionally with a
    ``"modality"`` entry (e.g. ``{"liver": 1, "spleen": 2, "modality": "CT"}``).

    Returns:
        ``(names, modality, path)``; ``({}, None, None)`` when no candidate exists. An
        unreadable sidecar is skipped with a warning.
    """
    for candidate in candidates:
        path = Path(candidate)
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable label sidecar %s: %s", path, err)
            continue
        modality = content.get("modality") if isinstance(content, Mapping) else None
        return parse_label_names(content), (str(modality) if modality else None), path
    return {}, None, None


def read_array(path: str) -> np.ndarray:
    """An image or label file as MONAI's ``LoadImage`` returns it (the infer task's reader)."""
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True)(path)
    return np.asarray(image.array if isinstance(image, MetaTensor) else image)


@dataclass
class LoadedImage:
    """An image ready for the predictor's preparation.

    Attributes:
        array: ``(X, Y, Z)`` raw volume (a 2D NIfTI/DICOM frame gets ``Z = 1``), or for a
            picture its ``(H, W, 3)`` uint8 display pixels.
        picture: PNG/JPEG... (display values, no intensity window).
        modality: canonical MedSegDB modality and ``modality_source``.
    """

    path: str
    array: np.ndarray
    picture: bool
    modality: str
    modality_source: str

    @property
    def depth(self) -> int:
        return 1 if self.picture else int(self.array.shape[2])

    @property
    def size_hw(self) -> tuple[int, int]:
        if self.picture:
            return int(self.array.shape[0]), int(self.array.shape[1])
        return int(self.array.shape[1]), int(self.array.shape[0])


def load_image(path: str, requested_modality: str | None = None) -> LoadedImage:
    """Read an image as the infer task does and settle its modality.

    Raises:
        ValueError: not a 3D volume or a 2D picture; a ``requested_modality`` that is not a
            modality name.
        Exception: whatever the reader raises for an unreadable file.
    """
    raw = read_array(path)
    picture = is_picture(path)
    if picture:
        if raw.ndim not in (2, 3):
            raise ValueError(f"picture {path} has shape {raw.shape}")
        modality = choose_modality(requested_modality, path, raw)
        return LoadedImage(path, picture_to_rgb(raw), True, modality.modality, modality.source)
    try:
        raw = loaded_volume_xyz(raw)
    except ValueError as err:
        raise ValueError(f"image {path}: {err}") from None
    modality = choose_modality(requested_modality, path, raw)
    return LoadedImage(path, raw, False, modality.modality, modality.source)


def label_stack(raw: np.ndarray, picture: bool) -> np.ndarray:
    """A label array as ``LoadImage`` returns it -> ``(Z, H, W)`` (the predictor's frame)."""
    raw = np.asarray(raw)
    if picture:
        if raw.ndim == 3:
            raw = raw[..., 0]  # an RGB(A) label picture: its values are in every channel
        return np.swapaxes(raw, 0, 1)[None]
    return volume_to_zhw(loaded_volume_xyz(raw))


@dataclass
class LabelledImage:
    """A readable labelled image: the image, its ``(Z, H, W)`` labels and its named structures.

    Attributes:
        structures: ``{label value: (name, slice indices where it covers >= min_pixels)}``.
    """

    image_id: str
    image: LoadedImage
    labels: np.ndarray
    structures: dict[int, tuple[str, np.ndarray]]


@dataclass
class VolumeEntry:
    """One labelled image of the datastore (JSON-friendly, so MONAI can partition a list of them)."""

    image_id: str
    image: str
    label: str
    label_info: dict = field(default_factory=dict)
    image_info: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "image": self.image, "label": self.label,
                "label_info": self.label_info, "image_info": self.image_info}


def labelled_volumes(datastore, tag: str = "final") -> list[dict[str, Any]]:
    """Every image with a ``tag`` label, sorted by id, as ``VolumeEntry.as_dict()`` dicts."""
    entries = []
    for image_id in sorted(datastore.get_labeled_images(tag)):
        try:
            image = datastore.get_image_uri(image_id)
            label = datastore.get_label_uri(image_id, tag)
            label_info = dict(datastore.get_label_info(image_id, tag) or {})
            image_info = dict(datastore.get_image_info(image_id) or {})
        except Exception as err:  # a datastore entry whose files vanished
            logger.warning("skipping %s: %s: %s", image_id, type(err).__name__, err)
            continue
        if not image or not label:
            logger.warning("skipping %s: image or label file missing", image_id)
            continue
        entries.append(VolumeEntry(image_id, image, label, label_info, image_info).as_dict())
    return entries


def sidecar_candidates(entry: Mapping[str, Any]) -> list[Path]:
    """``<id>_labels.json`` next to the label file, then next to the image."""
    name = f"{entry['image_id']}{SIDECAR_SUFFIX}"
    return [Path(entry["label"]).parent / name, Path(entry["image"]).parent / name]


@dataclass
class BuildReport:
    """What the builder took and what it skipped (for the logs and the train stats)."""

    volumes: list[str] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)
    slices: int = 0
    skipped: list[str] = field(default_factory=list)
    purpose: str = "fine-tuning set"

    def skip(self, message: str) -> None:
        logger.warning("%s: skipping %s", self.purpose, message)
        self.skipped.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {"volumes": list(self.volumes), "structures": list(self.structures), "slices": self.slices,
                "skipped": list(self.skipped)}


class SliceSetBuilder:
    """Builds ``SliceSample`` lists from labelled volume entries.

    Args:
        app_labels: the app's label map (name -> value), the last source of names.
        min_pixels: a slice shows a structure when it covers at least this many pixels.
        max_slices_per_structure: candidate slices kept per structure (evenly spread over
            the structure's extent); each epoch samples from them.
        max_slices_per_volume: candidate slices kept per volume, shared by its structures
            (at least 4 each), so that many labelled volumes do not exhaust memory.
    """

    def __init__(self, app_labels: Mapping[str, int] | None = None, min_pixels: int = MIN_STRUCTURE_PIXELS,
                 max_slices_per_structure: int = 64, max_slices_per_volume: int | None = None):
        self.app_names = {int(value): str(name) for name, value in (app_labels or {}).items()}
        self.min_pixels = int(min_pixels)
        self.max_slices_per_structure = int(max_slices_per_structure)
        self.max_slices_per_volume = max_slices_per_volume
        self.prepared = PreparedVolumes(capacity=2)

    def build(self, entries: Sequence[Mapping[str, Any]],
              report: BuildReport | None = None) -> tuple[list[SliceSample], BuildReport]:
        report = report or BuildReport()
        samples: list[SliceSample] = []
        for entry in entries:
            samples.extend(self._volume_samples(entry, report))
        report.slices += len(samples)
        return samples, report

    # -- one volume -------------------------------------------------------------------------
    def read(self, entry: Mapping[str, Any], report: BuildReport) -> LabelledImage | None:
        """Read one labelled image and name its structures; ``None`` (and a warning) if unusable."""
        image_id = str(entry["image_id"])
        label_info = entry.get("label_info") or {}
        image_info = entry.get("image_info") or {}
        sidecar_names, sidecar_modality, sidecar = read_label_sidecar(sidecar_candidates(entry))
        requested = label_info.get("modality") or image_info.get("modality") or sidecar_modality

        try:
            label_raw = read_array(entry["label"])
        except Exception as err:  # corrupt / unsupported file: readers raise many types
            report.skip(f"{image_id}: cannot read label {entry['label']}: {type(err).__name__}: {err}")
            return None
        try:
            image = load_image(entry["image"], requested)
        except Exception as err:
            report.skip(f"{image_id}: cannot read image {entry['image']}: {type(err).__name__}: {err}")
            return None

        labels = label_stack(label_raw, image.picture)
        expected = (image.depth, *image.size_hw)
        if labels.shape != expected:
            report.skip(f"{image_id}: label shape {labels.shape} (Z, H, W) differs from the image's {expected}")
            return None
        try:
            found = structure_slices(labels, self.min_pixels)
        except ValueError as err:
            report.skip(f"{image_id}: {err}")
            return None
        if not found:
            report.skip(f"{image_id}: the label is empty (no non-zero voxel)")
            return None

        names = self._names(image_id, found, label_info, sidecar_names, sidecar, report.purpose)
        structures: dict[int, tuple[str, np.ndarray]] = {}
        for value, slices in found.items():
            name = names.get(value)
            if name is None:
                report.skip(f"{image_id}: label value {value} has no name (label info, {SIDECAR_SUFFIX} sidecar "
                            "or the app's label map)")
            elif len(slices) == 0:
                report.skip(f"{image_id}: {name} (value {value}) covers fewer than {self.min_pixels} pixels on "
                            "every slice")
            else:
                structures[value] = (name, slices)
        if not structures:
            return None
        return LabelledImage(image_id, image, labels, structures)

    def _volume_samples(self, entry: Mapping[str, Any], report: BuildReport) -> list[SliceSample]:
        labelled = self.read(entry, report)
        if labelled is None:
            return []
        image = labelled.image
        per_structure = self.max_slices_per_structure
        if self.max_slices_per_volume:
            per_structure = min(per_structure, max(4, self.max_slices_per_volume // len(labelled.structures)))
        samples: list[SliceSample] = []
        for value, (name, slices) in labelled.structures.items():
            context = resolve(name, image.modality)
            stack = self.prepared_stack(image, context)
            structure = f"{labelled.image_id}:{value}"
            for z in evenly_spaced(slices.tolist(), per_structure):
                samples.append(SliceSample(
                    image=np.ascontiguousarray(stack[z]),
                    mask=labelled.labels[z] == value,
                    context=tuple(int(i) for i in context.indices),
                    structure=structure,
                    volume_id=labelled.image_id,
                    label_name=name,
                    slice_index=int(z),
                ))
            report.structures.append(f"{labelled.image_id}:{name}")
            logger.info("fine-tuning set: %s %s (value %d, %s, context %s): %d of %d slices", labelled.image_id, name,
                        value, image.modality, list(context.indices),
                        min(len(slices), per_structure), len(slices))
        report.volumes.append(labelled.image_id)
        return samples

    def _names(self, image_id: str, found: Mapping[int, np.ndarray], label_info: Mapping[str, Any],
               sidecar_names: Mapping[int, str], sidecar: Path | None, purpose: str) -> dict[int, str]:
        info_names = parse_label_names(label_info)
        names: dict[int, str] = {}
        from_app: list[str] = []
        for value in found:
            if value in info_names:
                names[value] = info_names[value]
            elif value in sidecar_names:
                names[value] = sidecar_names[value]
            elif value in self.app_names:
                names[value] = self.app_names[value]
                from_app.append(f"{value}={self.app_names[value]}")
        if from_app:
            logger.warning("%s: %s: label values named from the app's label map: %s (send label_info "
                           "with the label or add %s%s if these are not the structures)", purpose, image_id,
                           ", ".join(from_app), image_id, SIDECAR_SUFFIX)
        if sidecar is not None and any(v in sidecar_names and v not in info_names for v in found):
            logger.info("%s: %s: names from %s", purpose, image_id, sidecar)
        return names

    def prepared_stack(self, image: LoadedImage, context) -> np.ndarray:
        """``(Z, H, W)`` uint8 or, for a picture, ``(1, H, W, 3)``: the predictor's input pixels."""
        if image.picture:
            return image.array[None]
        signature = intensity_signature(image.modality, context)
        prepared, _ = self.prepared.get((image.path, signature), image.array, image.modality, context)
        return prepared


def split_volumes(entries: Sequence[Mapping[str, Any]], val_split: float, seed: int = 0) -> tuple[list, list]:
    """Hold out ``round(n * val_split)`` volumes (at least one when there are two or more).

    Returns:
        ``(train entries, validation entries)``; no validation volume when ``val_split <= 0``
        or only one volume is labelled.
    """
    entries = list(entries)
    if val_split <= 0 or len(entries) < 2:
        return entries, []
    count = min(len(entries) - 1, max(1, int(round(len(entries) * val_split))))
    order = np.random.default_rng(seed).permutation(len(entries))
    held_out = set(order[:count].tolist())
    train = [entry for i, entry in enumerate(entries) if i not in held_out]
    return train, [entry for i, entry in enumerate(entries) if i in held_out]


def hold_out_slices(samples: Sequence[SliceSample], min_slices: int = FinetuneBudget.holdout_min_slices,
                    ) -> tuple[list[SliceSample], list[SliceSample]]:
    """Slice-level validation when no volume can be spared (``medsegx.budget.split_for_validation``).

    Every 5th slice of a structure with at least ``min_slices`` slices is held out; a smaller
    structure validates on its training slices (they are in both lists).
    """
    train, val = split_for_validation([sample.structure for sample in samples], min_slices)
    return [samples[i] for i in train], [samples[i] for i in val]
