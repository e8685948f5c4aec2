"""The app's label map: MedSegDB tasks, the sample structures, and names added at request time."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from medsegx.taxonomy import label_names

logger = logging.getLogger(__name__)

#: Structure names of the bundled sample studies (``sample-data/``), as their label JSON spells them.
SAMPLE_STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "grey_matter", "white_matter")
EXTRA_LABELS_FILE = "extra_labels.json"


class LabelMap:
    """Name -> label value; values are unique so a client can name every value it receives.

    MedSegDB tasks keep ``task row + 1`` (:func:`medsegx.taxonomy.label_names`); the sample
    structures and every new name a client sends get the next free value, in order of
    arrival. New names are stored in ``<model_dir>/extra_labels.json`` so the values stay
    stable across restarts.

    ``labels`` is the same dict object for the app's lifetime: MONAI Label's ``/info`` reads
    it through the infer task, so added names show up there too.
    """

    def __init__(self, store_dir: str | os.PathLike | None = None):
        self.labels: dict[str, int] = dict(label_names())
        self._lock = threading.Lock()
        self._store = Path(store_dir) / EXTRA_LABELS_FILE if store_dir else None
        for name in SAMPLE_STRUCTURES:
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
        base = set(label_names()) | set(SAMPLE_STRUCTURES)
        extra = [name for name in self.labels if name not in base]
        self._store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._store.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(extra, handle, indent=2)
        os.replace(tmp, self._store)
