"""The app's label map: a short list a site configures, plus names added at request time."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

#: Structure names of the bundled sample studies (``sample-data/``), as their label JSON spells them.
SAMPLE_STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "grey_matter", "white_matter")
#: What ``/info`` offers by default (``--conf labels`` replaces it): the sample structures, then
#: the most common MedSegDB organs and lesions, TotalSegmentator's spelling. Every name resolves
#: to a MedSegDB task (``medsegx.taxonomy.resolve``); any other name still works in a request.
DEFAULT_LABELS = SAMPLE_STRUCTURES + (
    "pancreas", "gallbladder", "stomach", "duodenum", "colon", "rectum", "urinary_bladder", "prostate",
    "esophagus", "heart", "lung_left", "lung_right", "adrenal_gland_left", "adrenal_gland_right",
    "inferior_vena_cava", "hippocampus", "brain_tumor", "liver_tumor", "kidney_tumor", "lung_tumor",
    "thyroid_gland",
)
EXTRA_LABELS_FILE = "extra_labels.json"


class LabelMap:
    """Name -> label value; values are unique so a client can name every value it receives.

    The configured names get ``1, 2, ...`` in their order; every new name a client sends gets
    the next free value, in order of arrival, and is stored in
    ``<model_dir>/extra_labels.json`` so the values stay stable across restarts. Values are
    what OHIF's ``vista3d`` path sends back as ``label_prompt`` and reads in the result.

    ``labels`` is the same dict object for the app's lifetime: MONAI Label's ``/info`` reads
    it through the infer tasks, so added names show up there too.

    Args:
        store_dir: where ``extra_labels.json`` lives (``None``: names are not kept).
        names: the configured short list (default ``DEFAULT_LABELS``).
    """

    def __init__(self, store_dir: str | os.PathLike | None = None, names: tuple[str, ...] = DEFAULT_LABELS):
        self.labels: dict[str, int] = {}
        self._configured = tuple(names)
        self._lock = threading.Lock()
        self._store = Path(store_dir) / EXTRA_LABELS_FILE if store_dir else None
        for name in self._configured:
            self._append(name)
        for name in self._stored_names():
            self._append(name)

    def _stored_names(self) -> list[str]:
        if self._store is None or not self._store.is_file():
            return []
        try:
            names = json.loads(self._store.read_text())
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable %s: %s", self._store, err)
            return []
        return [str(name) for name in names] if isinstance(names, list) else []

    def _append(self, name: str) -> int:
        if name not in self.labels:
            self.labels[name] = max(self.labels.values(), default=0) + 1
        return self.labels[name]

    def value_of(self, name: str) -> tuple[int, bool]:
        """The label value for ``name``, appending it when new.

        Returns:
            ``(value, added)``; ``added`` is True when this call created the entry.
        """
        with self._lock:
            if name in self.labels:
                return self.labels[name], False
            value = self._append(name)
            self._save()
        logger.info("new label %r -> %d", name, value)
        return value, True

    def _save(self) -> None:
        if self._store is None:
            return
        base = set(self._configured)
        extra = [name for name in self.labels if name not in base]
        self._store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._store.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(extra, handle, indent=2)
        os.replace(tmp, self._store)
