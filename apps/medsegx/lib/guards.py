"""What a client may make the server read: its own studies only, and no file that costs more than allowed.

MONAI Label 0.8.5 lets ``POST /infer/{model}?image=/any/path`` segment any file the server can
read, and its local datastore follows symlinks and ``..`` out of the studies folder
(``docs/MONAILABEL_COMPAT.md`` #8). This leaf holds the app's checks; the endpoint wrapper
(``lib/concurrency.py``), ``main.py`` and the infer task call them:

- :func:`vet_infer_request`: the client's own ``image`` / ``session_id`` / ``file`` / ``params``,
  before upstream's ``run_inference`` turns an upload into a temporary path;
  :func:`check_app_image` then admits at ``MONAILabelApp.infer`` only what was vetted;
- :class:`StudiesOnlyDatastore`: upstream's local datastore that reads and writes inside its
  studies folder only (downloads, label saves, uploads, training lists);
- :func:`check_image_file` (header only, before loading) and :func:`check_loaded` (finite voxels);
- :class:`UploadLimit`: an ASGI wrapper that refuses a request body above ``max_upload_mb``
  before it is read; :func:`checked_create_session`: ``PUT /session/?uncompress=true`` unpacks
  only an archive whose members stay in its folder and add up to at most ``max_upload_mb``.

Every refusal is an ``HTTPException`` whose ``detail`` names the problem: 403 for a path outside
the studies, 404 for an unknown id or session, 413 for too many voxels or bytes, 415 for a file
type the server does not read, 422 for a file or parameter it cannot use.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import re
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from fastapi import Depends, File, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints import session as upstream_session
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from lib.durable import DurableDatastore

logger = logging.getLogger(__name__)

#: What the header checks read; any other file type is refused before a reader touches it.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".dcm")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Result files MONAI Label's writer may produce (``result_extension``).
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".png", ".jpg", ".jpeg")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
#: The most files a DICOM series folder may hold (one header read each).
MAX_SERIES_FILES = 5000
#: PIL modes of 8-bit pictures; 16-bit and float pictures are refused.
PICTURE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
NRRD_HEADER_MAX_BYTES = 65536
# a datastore id, label tag or session id: one path component, not hidden, no control characters
_NAME = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,254}$")

_vetted = threading.local()  # .kind: "id" | "file" | "session" while queued_infer runs a request


def _refuse(status: int, message: str) -> HTTPException:
    logger.warning("refused (%d): %s", status, message)
    return HTTPException(status_code=status, detail=message)


def check_name(value: Any, what: str) -> str:
    """A datastore id, label tag or session id must be one plain path component.

    Raises:
        HTTPException: 403 for a path (``/``, ``\\``, ``..``, a hidden name) or a control character.
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise _refuse(403, f"{what} {value!r} is not a plain name; the server reads only its own studies "
                      "(a datastore id, a session id from PUT /session/, or an uploaded file)")
    return value


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """``path`` resolves (symlinks and ``..`` followed) into ``root``."""
    resolved, base = os.path.realpath(path), os.path.realpath(root)
    return resolved == base or resolved.startswith(base.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------- which image


def vet_infer_request(image: str, session_id: str, has_file: bool, params: str, datastore, sessions) -> tuple[str, dict]:
    """Check the client's own values of ``POST /infer/{model}`` before upstream's ``run_inference``.

    ``image`` must be a datastore id; ``session_id`` a session of ``PUT /session/``; a ``file``
    upload needs neither. Upstream merges ``params`` into the request after ``image`` (so
    ``params.image`` would replace the query value, or the upload): it must not differ.

    Args:
        image: the ``image`` query value.
        session_id: the ``session_id`` query value.
        has_file: an image was uploaded as ``file``.
        params: the ``params`` form field (JSON text).
        datastore: the app's datastore.
        sessions: the app's ``Sessions`` (``None`` when disabled).

    Returns:
        ``(kind, params)``: ``"session"``, ``"file"`` or ``"id"``, and the parsed params.

    Raises:
        HTTPException: 403 for a path, 404 for an unknown id or session, 422 for bad params.
    """
    parsed = parse_params(params)
    if "image" in parsed and parsed["image"] != image:
        raise _refuse(422, f"params.image {parsed['image']!r} would replace the image; send the image id as "
                      "the `image` query parameter, or upload the file")
    if session_id:
        check_name(session_id, "session_id")
        session = sessions.get_session(session_id, update_ts=False) if sessions is not None else None
        if session is None:
            raise _refuse(404, f"session {session_id!r} not found (expired, or never created with PUT /session/)")
        if image:
            _datastore_image(image, datastore)
        return "session", parsed
    if has_file:
        if image:
            _datastore_image(image, datastore)  # upstream reads it for a `.bin` label (OHIF scribbles)
        return "file", parsed
    if not image:
        raise _refuse(422, "no image: send `image` (a datastore id), `session_id`, or upload `file`")
    _datastore_image(image, datastore)
    return "id", parsed


def parse_params(params: str) -> dict:
    """The ``params`` form field as a dict (upstream would answer 500 for bad JSON)."""
    try:
        parsed = json.loads(params) if params else {}
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the decoder's stack
        raise _refuse(422, f"params is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(parsed, dict):
        raise _refuse(422, f"params must be a JSON object, got {type(parsed).__name__}")
    extension = parsed.get("result_extension")
    if extension not in (None, "") and extension not in RESULT_EXTENSIONS:
        raise _refuse(422, f"result_extension {extension!r} is not one of {', '.join(RESULT_EXTENSIONS)}")
    dtype = parsed.get("result_dtype")
    if dtype not in (None, "") and dtype not in RESULT_DTYPES:
        raise _refuse(422, f"result_dtype {dtype!r} is not one of {', '.join(RESULT_DTYPES)}")
    if "label_tag" in parsed:
        check_name(parsed["label_tag"], "label_tag")
    return parsed


def _datastore_image(image: str, datastore) -> None:
    check_name(image, "image")
    if os.path.exists(image):  # MONAILabelApp.infer would read it from the server's working directory
        raise _refuse(403, f"image {image!r} names a file in the server's working directory, not a study")
    if isinstance(datastore, StudiesOnlyDatastore):
        uri = LocalDatastore.get_image_uri(datastore, image)
        if uri and not datastore.inside(uri):
            raise _refuse(403, f"image {image!r} resolves outside the studies folder")
    elif type(datastore) is LocalDatastore:
        uri = datastore.get_image_uri(image)
    else:  # a PACS (DICOMweb: a LocalDatastore subclass): get_image_uri downloads; MONAILabelApp.infer asks once
        return
    if not uri:
        raise _refuse(404, f"image {image!r} is not in the datastore")


@contextlib.contextmanager
def vetted(kind: str) -> Iterator[None]:
    """Mark the current thread's request as checked by :func:`vet_infer_request` while it runs."""
    _vetted.kind = kind
    try:
        yield
    finally:
        _vetted.kind = None


def check_app_image(image: Any, datastore) -> None:
    """At ``MONAILabelApp.infer``: a server path only for a vetted upload or session, else a datastore id.

    Upstream's ``MONAILabelApp.infer`` reads any existing path it is given; other routes
    (``/infer/wsi``, batch infer) reach it without :func:`vet_infer_request`.

    Raises:
        HTTPException: 403 for a path, 404 for an id not in the datastore.
    """
    if not isinstance(image, str):
        return  # an in-memory image from the server's own code
    if getattr(_vetted, "kind", None) in ("file", "session"):
        return  # upstream made this path from the client's upload
    _datastore_image(image, datastore)


class StudiesOnlyDatastore(DurableDatastore):
    """Upstream's local datastore, confined to its studies folder, its writes atomic (``lib/durable.py``).

    Upstream joins ids and tags into paths (``os.path.join(labels, tag)``), so
    ``PUT /datastore/label?tag=../../x`` or ``PUT /datastore/image?image=../x`` write outside the
    studies, and a symlink in the studies is served wherever it points. Here ids and tags must
    be plain names, and a file that resolves outside the folder is not served.
    ``StudiesOnlyDatastore.adopt(store)`` re-classes upstream's object (``DurableDatastore.adopt``).
    """

    def inside(self, path: str) -> bool:
        return is_inside(path, self._datastore_path)

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if uri and not self.inside(uri):
            logger.warning("image %r resolves outside the studies folder (%s): not served", image_id, uri)
            return ""
        return uri

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag)
        if uri and not self.inside(uri):
            logger.warning("label %r (%s) resolves outside the studies folder: not served", label_id, label_tag)
            return ""
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_name(image_id, "image id")
        else:
            check_name(self._to_id(os.path.basename(image_filename))[0], "image file name")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(image_id, "image")
        check_name(label_tag, "label tag")
        if image_id not in self._datastore.objects:  # upstream raises ImageNotFoundException: a 500
            raise _refuse(404, f"image {image_id!r} is not in the datastore; no label saved")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def datalist(self, full_path=True) -> list[dict[str, Any]]:
        items = super().datalist(full_path)
        return [item for item in items if self.inside(item["image"]) and self.inside(item["label"])]


# --------------------------------------------------------------------------- what a file costs


def check_image_file(path: Any, max_voxels: int) -> None:
    """Refuse an image by its header before a reader allocates it.

    Reads only headers: NIfTI (nibabel, lazy), NRRD (the text header), DICOM files and series
    folders (pydicom without pixels), PNG / JPEG (PIL, lazy). A 4D image must have one volume.

    Raises:
        HTTPException: 413 above ``max_voxels``; 415 for another file type; 422 for an unreadable
            header, a 4D image, a DICOM folder mixing series or missing slices, or a 16-bit picture.
    """
    if not isinstance(path, str) or not path:
        return
    name = os.path.basename(path.rstrip(os.sep)).lower()
    if os.path.isdir(path):
        shape = _dicom_series_shape(path)
    elif name.endswith((".nii", ".nii.gz")):
        shape = _nifti_shape(path)
    elif name.endswith(".nrrd"):
        shape = _nrrd_shape(path)
    elif name.endswith(".dcm"):
        shape = _dicom_shape(path)
    elif name.endswith(PICTURE_SUFFIXES):
        shape = _picture_shape(path, max_voxels)
    else:
        raise _refuse(415, f"image type of {name!r} is not read here; send one of "
                      f"{', '.join(VOLUME_SUFFIXES + PICTURE_SUFFIXES)} or a DICOM series")
    voxels = math.prod(int(size) for size in shape)
    if voxels > max_voxels:
        raise _refuse(413, f"image of shape {tuple(int(s) for s in shape)} has {voxels} voxels; "
                      f"this server takes at most {max_voxels} (--conf max_voxels)")


def check_loaded(image: Any) -> None:
    """Refuse NaN / inf voxels (no box or intensity window is defined on them).

    Raises:
        HTTPException: 422 naming how many voxels are not finite.
    """
    array = image.array if hasattr(image, "array") else np.asarray(image)
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        slabs = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        # slab by slab: the boolean temporary stays one slab, not one byte per voxel of the volume
        bad = sum(slab.size - int(np.count_nonzero(np.isfinite(slab))) for slab in slabs)
        if bad:
            raise _refuse(422, f"the image has {bad} NaN or infinite voxels; replace them before sending it")


def _spatial(shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    if any(int(size) < 1 for size in shape):
        raise _refuse(422, f"{os.path.basename(path)}: the header gives an empty shape {tuple(shape)}")
    if len(shape) > 3 and math.prod(int(size) for size in shape[3:]) > 1:
        raise _refuse(422, f"{os.path.basename(path)} is a {len(shape)}D image of shape {tuple(shape)}; "
                      "send one 3D volume (one time point / channel)")
    return tuple(shape[:3])


def _nifti_shape(path: str) -> tuple[int, ...]:
    import nibabel as nib

    try:
        header = nib.load(path).header  # lazy: reads the 348-byte header (and the first gzip block)
        shape = tuple(int(size) for size in header.get_data_shape())
    except (OSError, EOFError, ValueError, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as err:
        raise _refuse(422, f"{os.path.basename(path)}: not a readable NIfTI header ({type(err).__name__}: {err})") \
            from None
    return _spatial(shape, path)


def _nrrd_shape(path: str) -> tuple[int, ...]:
    with open(path, "rb") as stream:
        head = stream.read(NRRD_HEADER_MAX_BYTES)
    if not head.startswith(b"NRRD"):
        raise _refuse(422, f"{os.path.basename(path)}: not an NRRD file (no NRRD magic)")
    header = head.split(b"\n\n", 1)[0].decode("latin-1")
    fields = dict(line.split(":", 1) for line in header.splitlines()[1:] if ":" in line and not line.startswith("#"))
    fields = {key.strip().lower(): value.strip() for key, value in fields.items()}
    try:
        shape = tuple(int(size) for size in fields["sizes"].split())
    except (KeyError, ValueError):
        raise _refuse(422, f"{os.path.basename(path)}: NRRD header without valid `sizes`") from None
    kinds = fields.get("kinds", "").split()
    if len(kinds) == len(shape):  # a leading vector / RGB axis is a channel axis, not a space axis
        spatial = [size for size, kind in zip(shape, kinds) if kind.lower() in ("domain", "space", "time")]
        channels = math.prod(size for size, kind in zip(shape, kinds) if kind.lower() not in ("domain", "space", "time"))
        if channels > 4:
            raise _refuse(422, f"{os.path.basename(path)}: {channels} channels per voxel; send a scalar volume")
        shape = tuple(spatial)
    return _spatial(shape, path)


def _dicom_header(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types for a broken file
        raise _refuse(422, f"{os.path.basename(path)}: not a readable DICOM header ({type(err).__name__})") from None


def _dicom_shape(path: str) -> tuple[int, ...]:
    header = _dicom_header(path)
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    return _spatial((int(getattr(header, "Rows", 0)), int(getattr(header, "Columns", 0)), frames), path)


def _dicom_series_shape(folder: str) -> tuple[int, ...]:
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and not entry.name.startswith("."):
                files.append(entry.path)
                if len(files) > MAX_SERIES_FILES:
                    raise _refuse(413, f"the DICOM folder holds more than {MAX_SERIES_FILES} files")
    if not files:
        raise _refuse(422, f"the folder {os.path.basename(folder)!r} holds no DICOM file")
    series, rows, columns, frames, positions = set(), set(), set(), 0, []
    for file in files:
        header = _dicom_header(file)
        series.add(str(getattr(header, "SeriesInstanceUID", "")))
        rows.add(int(getattr(header, "Rows", 0)))
        columns.add(int(getattr(header, "Columns", 0)))
        frames += int(getattr(header, "NumberOfFrames", 1) or 1)
        positions.append(_slice_position(header))
    if len(series) > 1:
        raise _refuse(422, f"the DICOM folder mixes {len(series)} series; send one series")
    if len(rows) > 1 or len(columns) > 1:
        raise _refuse(422, f"the DICOM series mixes slice sizes {sorted(rows)} x {sorted(columns)}")
    if frames == len(files) and len(files) >= 3 and None not in positions:
        _check_slice_spacing(sorted(positions))
    return _spatial((rows.pop(), columns.pop(), frames), folder)


def _slice_position(header) -> float | None:
    """Position of a slice along its normal (mm): ImagePositionPatient . (row x column direction)."""
    try:
        orientation = [float(v) for v in header.ImageOrientationPatient]
        position = [float(v) for v in header.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(orientation) != 6 or len(position) != 3:
        return None
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))


def _check_slice_spacing(positions: list[float]) -> None:
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    if spacing <= 1e-3 or float(gaps.min()) <= 1e-3 * spacing:
        raise _refuse(422, "the DICOM series has two slices at the same position; send one series, each slice once")
    if float(gaps.max()) > 1.5 * spacing:
        missing = int(round(float(gaps.max()) / spacing)) - 1
        raise _refuse(422, f"the DICOM series misses slices: a gap of {float(gaps.max()):.2f} mm (about {missing} "
                      f"slice(s)) where slices are {spacing:.2f} mm apart")


def _picture_shape(path: str, max_voxels: int) -> tuple[int, ...]:
    from PIL import Image

    try:
        with Image.open(path) as picture:  # lazy: the header only
            width, height, mode = picture.width, picture.height, picture.mode
    except Image.DecompressionBombError as err:
        raise _refuse(413, f"{os.path.basename(path)}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _refuse(422, f"{os.path.basename(path)}: not a readable picture ({type(err).__name__}: {err})") from None
    if mode not in PICTURE_MODES:
        raise _refuse(422, f"{os.path.basename(path)} is a {mode!r} picture (16-bit or float); send an 8-bit "
                      "PNG / JPEG, or the image as NIfTI / DICOM")
    return (width, height)


# --------------------------------------------------------------------------- request bodies


class UploadLimit:
    """ASGI wrapper: a ``POST`` / ``PUT`` body above ``max_bytes`` is answered 413 before it is read.

    A ``Content-Length`` above the limit is refused at once; a chunked body is counted as it
    arrives and cut off at the limit (the endpoint then sees a disconnect).
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> bytes:
        limit_mb = self.max_bytes / (1024 * 1024)
        return json.dumps({"detail": f"request body above the server's upload limit of {limit_mb:g} MB "
                                     "(--conf max_upload_mb)"}).encode()

    async def _send_413(self, send) -> None:
        body = self._detail()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers: Mapping[bytes, bytes] = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            logger.warning("refused (413): %s %s declares %s bytes", scope["method"], scope.get("path"), declared)
            return await self._send_413(send)

        received = 0
        refused = False
        started = False

        async def counted_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    logger.warning("refused (413): %s %s body passed %d bytes", scope["method"], scope.get("path"),
                                   self.max_bytes)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused and not started:
                return  # the 413 below answers instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await self._send_413(send)


def wrap_served_stack(fastapi_app, wrapper_type: type, **attributes: Any) -> None:
    """Make ``wrapper_type(stack, **attributes)`` the outermost layer of the served app (idempotent).

    The FastAPI app has started when the MONAI Label app is built (lifespan start-up), so
    ``add_middleware`` is closed; Starlette calls ``app.middleware_stack`` for every request.
    A wrapper of that type already outermost (``POST /reload`` builds the app again) only gets
    the new ``attributes``.
    """
    stack = fastapi_app.middleware_stack
    if stack is None:
        stack = fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    if isinstance(stack, wrapper_type):
        for name, value in attributes.items():
            setattr(stack, name, value)
    else:
        fastapi_app.middleware_stack = wrapper_type(stack, **attributes)


def install_upload_limit(fastapi_app, max_bytes: int) -> None:
    """Wrap the served app's middleware stack in :class:`UploadLimit` (idempotent; ``POST /reload`` updates it)."""
    wrap_served_stack(fastapi_app, UploadLimit, max_bytes=max_bytes)


# --------------------------------------------------------------------------- session archives

SESSION_PATH = f"{settings.MONAI_LABEL_API_STR}/session/"


def check_archive(stream, name: str, max_bytes: int) -> None:
    """Refuse an archive ``shutil.unpack_archive`` would unpack into a bomb or out of its folder.

    Reads the member list only (a tar's headers as the stream is read, stopping at ``max_bytes``).

    Raises:
        HTTPException: 413 above ``max_bytes`` unpacked or ``MAX_SERIES_FILES`` members; 403 for
            an absolute or ``..`` member, a link or a device; 415 for a file that is no zip or tar.
    """
    count, total = 0, 0
    stream.seek(0)
    if zipfile.is_zipfile(stream):
        stream.seek(0)
        with zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                count, total = count + 1, total + info.file_size
                _check_member(info.filename, count, total, name, max_bytes)
    else:
        stream.seek(0)
        try:
            with tarfile.open(fileobj=stream, mode="r:*") as archive:
                for info in archive:  # one header at a time
                    if not (info.isfile() or info.isdir()):
                        raise _refuse(403, f"{name}: member {info.name!r} is a link or device; send plain files")
                    count, total = count + 1, total + info.size
                    _check_member(info.name, count, total, name, max_bytes)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise _refuse(415, f"{name}: uncompress takes a zip or tar archive ({type(err).__name__})") from None
    stream.seek(0)


def _check_member(member: str, count: int, total: int, name: str, max_bytes: int) -> None:
    parts = member.replace("\\", "/").split("/")
    if member.startswith(("/", "\\")) or ".." in parts or (len(member) > 1 and member[1] == ":"):
        raise _refuse(403, f"{name}: member {member!r} would unpack outside the session folder")
    if count > MAX_SERIES_FILES:
        raise _refuse(413, f"{name}: more than {MAX_SERIES_FILES} members")
    if total > max_bytes:
        raise _refuse(413, f"{name}: unpacks to more than {max_bytes / (1024 * 1024):g} MB (--conf max_upload_mb)")


def checked_create_session(
    background_tasks: BackgroundTasks,
    uncompress: bool = False,
    expiry: int = 0,
    files: list[UploadFile] = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """Upstream's ``PUT /session/`` (same parameters and answers) with archives checked before unpacking.

    A plain ``def``: FastAPI runs it in its thread pool, so reading an archive's member list and
    copying the files (upstream's endpoint does that on the event loop) keep the loop free.
    """
    if uncompress:
        max_bytes = app_instance().settings.max_upload_mb * 1024 * 1024
        for upload in files:
            check_archive(upload.file, upload.filename or "archive", max_bytes)
    return upstream_session.create_session(background_tasks, uncompress, expiry, files)
