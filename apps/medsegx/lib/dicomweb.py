"""MONAI Label 0.8.5's DICOMweb datastore, with the fixes a PACS needs (``docs/MONAILABEL_COMPAT.md`` #7).

With ``--studies http(s)://.../dicom-web`` MONAI Label serves images from a PACS: an image id
is a ``SeriesInstanceUID``; the series is downloaded into a cache folder ``<cache>/<uid>/`` and
converted to ``<cache>/<uid>.nii.gz``; a ``final`` label is saved locally and uploaded as a
DICOM-SEG (dcmqi's ``itkimage2segimage``) that references the series. Upstream's
``DICOMWebDatastore`` gets four things wrong that this app depends on; :class:`PACSDatastore`
fixes them and keeps everything else (client, cache, upload) as upstream builds it:

1. ``get_image_uri`` returns a temporary file the first time a series is converted (a copy
   goes into the cache, the temporary file is never deleted): the infer task cannot find the
   cached series next to it (``lib/modality.py`` reads the ``Modality`` tag there). Here it
   always returns the cached ``<uid>.nii.gz``.
2. ``save_label`` names the DICOM-SEG segments by *position* in ``label_info`` (the i-th
   non-zero value gets the i-th entry), not by the entry's ``idx``: a label holding values
   {1, 3} with ``label_info`` for 1, 2, 3 names segment 3 after label 2, and a label saved
   without ``label_info`` gets segments called ``unknown``. Here each value is named by its
   ``idx`` entry, else positionally as upstream, else from the app's label map. (An empty
   label, which upstream fails to upload, stays in the cache.)
3. A DICOM-SEG read back from the PACS (a new cache, another server, the train task's
   process) becomes a label covering only the slices that hold a segment (pydicom-seg's
   reader returns the frames' extent), so it no longer matches its image (upstream #305,
   MONAI #7055). Here it is resampled onto the image's voxel grid (nearest neighbour, the
   same lattice: voxels are copied, not interpolated).
4. Every save uploads a new DICOM-SEG series (labels are versioned in the PACS, none is
   deleted), and upstream then takes whichever series the PACS lists first for an image,
   lists that image once per version, and calls ``get_label_uri(image_id, tag)`` (what the
   local datastore and the train task call) with a label series id. Here the newest version
   (``SeriesDate`` / ``SeriesTime``; on a tie the one this server saved last) is the image's
   final label, each image is listed once, and ``get_label_uri`` takes an image id as
   every other datastore does.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value


@dataclass(frozen=True)
class SegSeries:
    """One DICOM-SEG series in the PACS and the image series it labels."""

    study_uid: str
    series_uid: str
    image_id: str
    saved_at: str  # SeriesDate + SeriesTime, sortable


class PACSDatastore(DICOMWebDatastore):
    """Upstream's DICOMweb datastore with the fixes listed in this module's docstring.

    Build it with :meth:`adopt` from the datastore MONAI Label made (its constructor builds the
    DICOMweb client from the server settings and starts the cache's file watcher; neither is
    repeated here).
    """

    app_labels: Mapping[str, int] = MappingProxyType({})  # set by adopt()

    @classmethod
    def adopt(cls, upstream: DICOMWebDatastore, app_labels: Mapping[str, int]) -> "PACSDatastore":
        """Turn MONAI Label's own ``DICOMWebDatastore`` into this class (same state, fixed methods).

        Args:
            upstream: what ``MONAILabelApp._init_dicomweb_datastore`` returned.
            app_labels: the app's label map (name -> value), read when a saved label has no name.
        """
        if not isinstance(upstream, DICOMWebDatastore):
            raise TypeError(f"expected MONAI Label's DICOMWebDatastore, got {type(upstream).__name__}")
        upstream.__class__ = cls
        upstream.app_labels = app_labels
        return upstream

    # -- 1. images: the cached NIfTI, beside its series folder --------------------------------
    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if not self._convert_to_nifti:
            return uri
        cached = LocalDatastore.get_image_uri(self, image_id)
        if cached and os.path.realpath(uri) != os.path.realpath(cached):
            if os.path.dirname(os.path.realpath(uri)) == os.path.realpath(tempfile.gettempdir()):
                os.unlink(uri)  # upstream's conversion, already copied into the cache
            return cached
        return uri

    # -- 2. saving: segments named after their labels ------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        if label_tag != FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        converted = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":  # OHIF's raw labelmap
            converted = label_filename = binary_to_image(self.get_image_uri(image_id), label_filename)
        try:
            values = _label_values(label_filename)
            if not values:  # upstream would fail reading the DICOM-SEG dcmqi refused to write
                logger.warning("%s: empty final label kept in the cache only (a DICOM-SEG needs a segment)", image_id)
                return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
            named = segment_names(values, label_info.get("label_info"), self.app_labels)
            return super().save_label(image_id, label_filename, label_tag, {**label_info, "label_info": named})
        finally:
            if converted:
                os.unlink(converted)

    # -- 3 + 4. final labels: the newest DICOM-SEG per image, on the image's grid ---------------
    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        if label_tag not in (None, FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        return sorted(self._sync_final_labels())

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag, labels)))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The local label file of image ``image_id or label_id`` (labels are keyed by image id)."""
        return LocalDatastore.get_label_uri(self, image_id or label_id, label_tag)

    def _download_labeled_data(self) -> None:  # what upstream's datalist() calls first
        self._sync_final_labels()

    def remote_final_labels(self) -> dict[str, SegSeries]:
        """The final label of every listed image that has one: its newest DICOM-SEG series."""
        images = set(self.list_images())
        newest: dict[str, SegSeries] = {}
        for found in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            summary = Dataset.from_json(found)
            study_uid, series_uid = str(summary.StudyInstanceUID), str(summary.SeriesInstanceUID)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(study_uid, series_uid)[0])
            references = meta.get("ReferencedSeriesSequence")
            if not references:
                logger.warning("DICOM-SEG %s ignored: no ReferencedSeriesSequence", series_uid)
                continue
            image_id = str(references[0].SeriesInstanceUID)
            if image_id not in images:
                continue
            seg = SegSeries(study_uid, series_uid, image_id, f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}")
            if image_id not in newest or self._newer(seg, newest[image_id]):
                newest[image_id] = seg
        return newest

    def _newer(self, seg: SegSeries, other: SegSeries) -> bool:
        if seg.saved_at != other.saved_at:
            return seg.saved_at > other.saved_at
        # saved within the same second: the one this server saved last, else any fixed choice
        saved_here = self._local_label_info(seg.image_id).get("SeriesInstanceUID")
        return seg.series_uid == saved_here or (other.series_uid != saved_here and seg.series_uid > other.series_uid)

    def _local_label_info(self, image_id: str) -> dict[str, Any]:
        try:
            return dict(LocalDatastore.get_label_info(self, image_id, FINAL) or {})
        except Exception:  # no local label yet
            return {}

    def _sync_final_labels(self) -> dict[str, SegSeries]:
        remote = self.remote_final_labels()
        for image_id, seg in remote.items():
            local_file = LocalDatastore.get_label_uri(self, image_id, FINAL)
            if local_file and self._local_label_info(image_id).get("SeriesInstanceUID") == seg.series_uid:
                continue
            self._fetch_label(seg)
        return remote

    def _fetch_label(self, seg: SegSeries) -> None:
        """Download ``seg``, put it on its image's grid and keep it as the image's local final label."""
        image_file = self.get_image_uri(seg.image_id)
        dataset = self._client.retrieve_series(seg.study_uid, seg.series_uid)[0]
        label_file = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        try:
            segments = seg_to_label_file(dataset, image_file, label_file)
            info = {"label_info": segments, "SeriesInstanceUID": seg.series_uid, "StudyInstanceUID": seg.study_uid}
            LocalDatastore.save_label(self, seg.image_id, label_file, FINAL, info)
        finally:
            os.unlink(label_file)
        logger.info("final label of %s: DICOM-SEG %s (%s)", seg.image_id, seg.series_uid,
                    ", ".join(s["name"] for s in segments))


def segment_names(values: list[int], label_info: Any, app_labels: Mapping[str, int]) -> list[dict[str, Any]]:
    """One ``label_info`` entry per label value, in value order, each with its ``name`` and ``idx``.

    Args:
        values: the label's non-zero values, ascending.
        label_info: what the client sent (``[{"name": "liver", "idx": 1}, ...]``; entries without
            ``idx`` are matched by position, as MONAI Label does), or ``None``.
        app_labels: name -> value, for values the client did not name.
    """
    entries = [dict(entry) for entry in label_info or [] if isinstance(entry, Mapping)]
    by_value = {int(entry["idx"]): entry for entry in entries if str(entry.get("idx", "")).lstrip("-").isdigit()}
    unindexed = [entry for entry in entries if "idx" not in entry]
    app_names = {value: name for name, value in app_labels.items()}
    named = []
    for position, value in enumerate(values):
        entry = by_value.get(value) or (unindexed[position] if position < len(unindexed) else {})
        name = entry.get("name") or app_names.get(value) or f"label_{value}"
        named.append({**entry, "name": name, "idx": value})
    return named


def _label_values(label_file: str) -> list[int]:
    import SimpleITK as sitk

    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_file)))
    return [int(v) for v in values if v != 0]


def seg_to_label_file(dataset: Dataset, image_file: str, label_file: str) -> list[dict[str, Any]]:
    """Write a DICOM-SEG as a label on the voxel grid of ``image_file``; return its segments.

    Voxel values are the SEG's segment numbers (``[{"name": SegmentLabel, "idx": number}, ...]``).
    """
    import pydicom_seg
    import SimpleITK as sitk

    decoded = pydicom_seg.MultiClassReader().read(dataset).image
    reference = sitk.ReadImage(image_file)
    on_grid = sitk.Resample(decoded, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            decoded.GetPixelID())
    sitk.WriteImage(on_grid, label_file, True)
    return [{"name": str(s.SegmentLabel), "idx": int(s.SegmentNumber)} for s in dataset.SegmentSequence]
