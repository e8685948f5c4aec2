"""Datastore files written whole or not at all (``docs/MONAILABEL_COMPAT.md`` #9).

MONAI Label 0.8.5's ``LocalDatastore`` (``monailabel/datastore/local.py``) writes a saved label
with ``shutil.copy(label_filename, <labels>/<tag>/<image id><ext>)``, an uploaded image the same
way into the images folder, and its index ``datastore_v2.json`` with ``open(path, "w")``. A server
killed during one of those writes leaves a truncated file under the final name: the label is
listed (and trained on) though half of it is missing, and a truncated index makes the next start
fail (``_init_from_datastore_file(throw_exception=True)``).

:class:`DurableDatastore` overrides those three writes and nothing else: each goes to a hidden
temporary file in the same folder (``.<name>.<random>.partial``), is flushed to the disk
(``fsync``) and renamed over the final name (``os.replace``, one atomic step on a POSIX file
system), and the folder is flushed too. A reader sees the previous file or the complete new one.
The temporary names match none of the datastore's patterns (``*.nii.gz``, ``*.nii``, ...), so a
leftover from a killed server is never listed; :meth:`DurableDatastore.adopt` removes such
leftovers when the server starts, and makes upstream's file watcher (auto reload) take a rename
onto the index or a label for the change it is: the server reloads an index that MONAI Label's
train or scoring subprocess replaced. Concurrent saves for one image run one after another under
upstream's ``FileLock``, so the last complete save wins.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException
from watchdog.events import FileModifiedEvent

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _fsync_folder(folder: str | os.PathLike) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(destination: str | os.PathLike, source: str | os.PathLike | None = None,
                     data: bytes | None = None) -> None:
    """Put ``source``'s bytes (or ``data``) at ``destination`` in one rename, flushed to the disk.

    Raises:
        OSError: the copy failed (e.g. no space left); ``destination`` is then untouched and the
            temporary file removed.
    """
    destination = Path(destination)
    descriptor, partial = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX,
                                           dir=destination.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            if source is not None:
                with open(source, "rb") as original:
                    shutil.copyfileobj(original, stream, 1024 * 1024)
            else:
                stream.write(data or b"")
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(partial, 0o644)  # mkstemp makes it 0600; shutil.copy, which this replaces, kept the source's mode
        os.replace(partial, destination)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    _fsync_folder(destination.parent)


def remove_leftovers(paths: Iterable[Path], what: str) -> list[Path]:
    """Unlink the temporary files an interrupted write left; ``what`` names them in the one log line."""
    removed = list(paths)
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        logger.warning("removed %d %s: %s", len(removed), what, ", ".join(path.name for path in removed))
    return removed


def partial_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`write_atomically` left in ``folder`` (one level, hidden, ``.partial``)."""
    folder = Path(folder)
    return sorted(folder.glob(f".*{PARTIAL_SUFFIX}")) if folder.is_dir() else []


class DurableDatastore(LocalDatastore):
    """Upstream's local datastore whose label, image and index writes are atomic and durable."""

    @classmethod
    def adopt(cls, store: LocalDatastore):
        """Re-class upstream's datastore object (built with the server's settings) and drop leftovers."""
        store.__class__ = cls
        handler = getattr(store, "_handler", None)  # the file watcher of MONAI_LABEL_DATASTORE_AUTO_RELOAD
        if handler is not None:
            handler.on_moved = store._on_moved_event
        store.remove_partial_files()
        return store

    def _on_moved_event(self, event) -> None:
        # Upstream's watcher reacts to "created" / "modified"; a rename into place (write_atomically, also in
        # the train and scoring processes, which write scores into the index) is a "moved" event to it.
        if event.dest_path == self._datastore_config_path:
            self._on_modify_event(FileModifiedEvent(event.dest_path))
        else:
            self._on_any_event(event)

    def remove_partial_files(self) -> list[Path]:
        """Remove temporary files a killed writer left in the images and label folders."""
        folders = [self._datastore.image_path(), self._datastore_path]
        labels = self._datastore.label_path(None)
        if os.path.isdir(labels):
            folders += [entry.path for entry in os.scandir(labels) if entry.is_dir()]
        unique = dict.fromkeys(os.path.realpath(folder) for folder in folders)
        with FileLock(self._lock_file):  # every write holds it: no partial file is in use now
            return remove_leftovers([path for folder in unique for path in partial_files(folder)],
                                    "partial datastore file(s) of an interrupted write")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        # upstream's save_label with the copy made atomic (its shutil.copy leaves a partial label on a kill)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        logger.info("Saving label for image %s, tag %s: %s", image_id, label_tag, name)
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            write_atomically(os.path.join(label_path, name), source=label_filename)
            label_info = dict(label_info) if label_info else {}
            label_info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        # upstream's add_image with the copy made atomic
        default_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        name = self._filename(image_id, image_ext)
        logger.info("Adding image %s => %s", image_id, name)
        with FileLock(self._lock_file):
            write_atomically(os.path.realpath(os.path.join(self._datastore.image_path(), name)), source=image_filename)
            image_info = dict(image_info) if image_info else {}
            image_info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=image_info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        # upstream opens datastore_v2.json with "w": a kill mid-write leaves an index the next start refuses
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_atomically(self._datastore_config_path, data=text.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
