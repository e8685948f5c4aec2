"""Turn an infer request from a stock client into a validated prompt, or a 4xx.

Frames: the image array is indexed as MONAI's ``LoadImage`` returns it, ``(i, j, k)`` for a
volume and ``(i, j)`` for a 2D picture (PIL images come back as ``(width, height)``); these
are the IJK indices 3D Slicer and OHIF compute from their RAS / world coordinates. ``x`` is
``i``, ``y`` is ``j``, ``z`` is ``k``.

The one ``roi`` layout is the 3D Slicer plugin's (``getROIPointsXYZ`` in the MONAI Label
0.8.5 plugin): the ROI's RAS min / max corners through the volume's RAS-to-IJK matrix,
rounded, **per axis**: ``[i_a, i_b, j_a, j_b, k_a, k_b]``, bounds inclusive. The pairs are
not sorted (an affine that flips an axis, as most DICOM-derived CT has, gives
``i_a > i_b``), so each pair is sorted here. A 2D picture takes ``[i_a, i_b, j_a, j_b]``. A
box that sticks out of the image is clipped; one that misses the image is a 422.

Clicks: ``foreground`` / ``background`` = ``[[i, j, k], ...]`` (Slicer, OHIF ``deepgrow``) or
``points`` + ``point_labels`` (OHIF ``vista3d``: 1 foreground, 0 background). On a volume every
click acts on its own slice (``Prompt.clicks``, in the order the client sent them: Slicer's
foreground list, then its background list; OHIF's points as placed), through
``medsegx.propagation``: a 3D box is segmented first and each click corrects it; clicks alone
start from the first foreground click. A one-slice request (``slice``, ``propagate: false``, a
2D picture) segments the one slice with the clicks on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

ROI_LAYOUT = "[i_a, i_b, j_a, j_b, k_a, k_b] voxel indices (3D Slicer's ROI layout; pairs in any order)"
_NO_PROMPT = f"a prompt is required: roi = {ROI_LAYOUT}, or at least one foreground click [i, j, k]"
#: The most points one request may carry (Slicer and OHIF send a handful).
MAX_POINTS = 1000
#: The most clicks one propagated (3D) request may carry: each is a correction replayed in order when
#: the server has not kept the request before it (``medsegx.propagation.SessionCache``).
MAX_VOLUME_CLICKS = 100
#: The longest structure name a request may carry (MedSegDB names and Slicer segment names are short).
MAX_LABEL_CHARS = 128
#: 3D Slicer names new segments "Segment_1", "Segment_2", ...: not a structure name.
_UNNAMED_SEGMENT = re.compile(r"^segment[_ ]?\d*$", re.IGNORECASE)


class RequestError(HTTPException):
    """A bad infer request: MONAI Label's endpoint re-raises it, FastAPI answers ``status_code``.

    The server stays up; the client gets ``{"detail": message}``.
    """

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(status_code=status_code, detail=message)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


@dataclass(frozen=True)
class Prompt:
    """A validated prompt in the loaded array's voxel indices.

    Attributes:
        box_xyxy: ``(x0, y0, x1, y1)`` inclusive voxel indices, clipped; ``None`` for clicks alone.
        z_range: ``(z0, z1)`` inclusive slices the result may cover; ``(0, 0)`` for a picture.
        slice_index: the slice segmented first (the box's middle slice, or the clicked one).
        is_3d: True when more than one slice may be segmented (3D box or propagated clicks).
        foreground / background: ``(x, y)`` clicks on ``slice_index``.
        clicks: every click ``(x, y, z, is_foreground)`` in the order sent (a 3D request's prompts;
            ``z`` 0 on a picture).
        box_slices: ``(z0, z1)`` of a box of more than one slice (a 3D box), else ``None``.
    """

    box_xyxy: tuple[int, int, int, int] | None
    z_range: tuple[int, int]
    slice_index: int
    is_3d: bool
    foreground: tuple[tuple[float, float], ...] = ()
    background: tuple[tuple[float, float], ...] = ()
    clicks: tuple[tuple[float, float, int, bool], ...] = ()
    box_slices: tuple[int, int] | None = None

    @property
    def has_clicks(self) -> bool:
        return bool(self.foreground)

    def as_json(self) -> dict[str, Any]:
        roi = None
        if self.box_xyxy is not None:
            x0, y0, x1, y1 = self.box_xyxy
            roi = [x0, x1, y0, y1, self.z_range[0], self.z_range[1]]
        return {"roi": roi, "slice": self.slice_index, "mode": "3d" if self.is_3d else "2d",
                "clicks": {"foreground": sum(1 for c in self.clicks if c[3]),
                           "background": sum(1 for c in self.clicks if not c[3])}}


def _numbers(value: Any, what: str) -> list[float]:
    if isinstance(value, str):
        value = value.replace("[", " ").replace("]", " ").replace(",", " ").split()
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise RequestError(f"{what} must be a list of numbers, got {value!r}")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a list of numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise RequestError(f"{what} must hold finite numbers, got {value!r}")
    return numbers


def _clipped_pair(low: float, high: float, size: int, axis: str, roi: list[float]) -> tuple[int, int]:
    low, high = sorted((round(low), round(high)))
    if high < 0 or low > size - 1:
        raise RequestError(f"roi {roi} lies outside the image along {axis} (valid indices 0..{size - 1}); "
                           f"roi is {ROI_LAYOUT}")
    return max(low, 0), min(high, size - 1)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0)


def _point_list(value: Any, name: str) -> list[list[float]]:
    if _empty(value):
        return []
    if isinstance(value, str):
        raise RequestError(f"{name} must be a list of [i, j, k] points, got {value!r}")
    if not isinstance(value, Sequence):
        raise RequestError(f"{name} must be a list of [i, j, k] points, got {value!r}")
    if len(value) > MAX_POINTS:
        raise RequestError(f"{name} has {len(value)} points; at most {MAX_POINTS} are accepted")
    points = []
    for point in value:
        coords = _numbers(point, f"{name} point")
        if len(coords) not in (2, 3):
            raise RequestError(f"{name} point {point!r} must be [i, j] or [i, j, k]")
        points.append(coords)
    return points


def _clicks(params: Mapping[str, Any]) -> tuple[list[list[float]], list[list[float]]]:
    """``(foreground, background)`` from either client's keys."""
    foreground = _point_list(params.get("foreground"), "foreground")
    background = _point_list(params.get("background"), "background")
    points = _point_list(params.get("points"), "points")
    if points:
        labels = params.get("point_labels")
        labels = [1] * len(points) if _empty(labels) else _numbers(labels, "point_labels")
        if len(labels) != len(points):
            raise RequestError(f"point_labels has {len(labels)} values for {len(points)} points")
        for point, label in zip(points, labels):
            if label not in (0, 1):
                raise RequestError(f"point_labels must be 1 (foreground) or 0 (background), got {label!r}")
            (foreground if label == 1 else background).append(point)
    return foreground, background


def _no_prompt(background: list) -> str:
    return _NO_PROMPT + (" (background clicks alone do not say what to segment)" if background else "")


def _slice_param(params: Mapping[str, Any], size_z: int) -> int | None:
    value = params.get("slice")
    if value in ("", None) or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0):
        return None  # MONAI Label clients send -1 (OHIF) or nothing for "no slice"
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"slice must be an integer, got {value!r}") from None
    if not 0 <= index < size_z:
        raise RequestError(f"slice {index} is outside the image (valid slices 0..{size_z - 1})")
    return index


def parse_prompt(params: Mapping[str, Any], spatial_shape: Sequence[int], propagate: bool = True) -> Prompt:
    """Validate ``roi``, ``slice`` and clicks against the loaded image.

    Args:
        params: the infer request: ``roi`` and/or clicks; ``slice`` optional.
        spatial_shape: ``(X, Y)`` for a 2D picture or ``(X, Y, Z)`` for a volume.
        propagate: clicks without a box (or with a one-slice box) on a volume are propagated
            through the structure; False segments the clicked slice only.

    Raises:
        RequestError: 422 with a message naming the bad field.
    """
    volume = len(spatial_shape) == 3
    size_x, size_y = int(spatial_shape[0]), int(spatial_shape[1])
    size_z = int(spatial_shape[2]) if volume else 1
    foreground, background = _clicks(params)

    box = None
    box_z: tuple[int, int] | None = None
    if not _empty(params.get("roi")):
        roi = _numbers(params["roi"], "roi")
        if len(roi) not in (4, 6):
            raise RequestError(f"roi must have 6 numbers {ROI_LAYOUT} (4 on a 2D picture), got {len(roi)}")
        x0, x1 = _clipped_pair(roi[0], roi[1], size_x, "i", roi)
        y0, y1 = _clipped_pair(roi[2], roi[3], size_y, "j", roi)
        box = (x0, y0, x1, y1)
        if volume and len(roi) == 6:
            box_z = _clipped_pair(roi[4], roi[5], size_z, "k", roi)
        elif volume and _slice_param(params, size_z) is None and not foreground:
            raise RequestError(f"a 4-number roi on a volume needs `slice` or a click; or send {ROI_LAYOUT}")
    if box is None and not foreground:
        raise RequestError(_no_prompt(background))

    for name, points in (("foreground", foreground), ("background", background)):
        for point in points:
            inside = 0 <= point[0] <= size_x - 1 and 0 <= point[1] <= size_y - 1
            if len(point) == 3 and volume:
                inside = inside and 0 <= point[2] <= size_z - 1
            if not inside:
                bounds = f"i 0..{size_x - 1}, j 0..{size_y - 1}" + (f", k 0..{size_z - 1}" if volume else "")
                raise RequestError(f"{name} point {point} is outside the image ({bounds})")

    if not volume:
        slice_index, z_range, is_3d = 0, (0, 0), False
    else:
        forced = _slice_param(params, size_z)
        clicked = next((round(p[2]) for p in reversed(foreground) if len(p) == 3), None)
        if forced is not None:  # a 2D request: this slice only
            slice_index, z_range, is_3d = forced, (forced, forced), False
        elif box_z is not None and box_z[1] > box_z[0]:  # a 3D box; clicks correct it on their own slices
            slice_index = (box_z[0] + box_z[1]) // 2
            z_range, is_3d = box_z, True
        else:
            if box_z is not None:
                slice_index = box_z[0]
            elif clicked is not None:
                slice_index = clicked
            else:
                raise RequestError("clicks on a volume need [i, j, k] (the slice k), or send `slice`")
            z_range, is_3d = ((0, size_z - 1), True) if (propagate and foreground) else ((slice_index, slice_index), False)

    def on_slice(points: list[list[float]]) -> tuple[tuple[float, float], ...]:
        return tuple((p[0], p[1]) for p in points if len(p) == 2 or not volume or round(p[2]) == slice_index)

    def with_slice(points: list[list[float]], is_foreground: bool) -> list[tuple[float, float, int, bool]]:
        return [(p[0], p[1], round(p[2]) if len(p) == 3 and volume else slice_index, is_foreground) for p in points]

    clicks = _ordered_clicks(params, with_slice(foreground, True), with_slice(background, False))
    if is_3d and len(clicks) > MAX_VOLUME_CLICKS:
        raise RequestError(f"{len(clicks)} clicks on a volume; at most {MAX_VOLUME_CLICKS} clicks per structure are "
                           "accepted (start a new segment, or send `slice` to segment one slice)")
    box_slices = box_z if box_z is not None and box_z[1] > box_z[0] and is_3d else None
    return Prompt(box_xyxy=box, z_range=z_range, slice_index=slice_index, is_3d=is_3d,
                  foreground=on_slice(foreground), background=on_slice(background), clicks=tuple(clicks),
                  box_slices=box_slices)


def _ordered_clicks(params: Mapping[str, Any], foreground: list, background: list) -> list:
    """Clicks in the order the client made them, as far as it says: OHIF's ``points`` are in order
    (placed after any ``foreground`` / ``background`` keys); Slicer's two lists are foreground first."""
    points = _point_list(params.get("points"), "points")
    if not points:
        return foreground + background
    listed_foreground = len(_point_list(params.get("foreground"), "foreground"))
    listed_background = len(_point_list(params.get("background"), "background"))
    ordered = foreground[:listed_foreground] + background[:listed_background]
    extra_foreground, extra_background = iter(foreground[listed_foreground:]), iter(background[listed_background:])
    labels = params.get("point_labels")
    labels = [1] * len(points) if _empty(labels) else _numbers(labels, "point_labels")
    for label in labels:
        ordered.append(next(extra_foreground) if label == 1 else next(extra_background))
    return ordered


def check_required(params: Mapping[str, Any]) -> None:
    """Fail fast, before the image is read, on a request with neither a box nor a click."""
    foreground, background = _clicks(params)
    if _empty(params.get("roi")) and not foreground:
        raise RequestError(_no_prompt(background))


def parse_label(params: Mapping[str, Any], labels: Mapping[str, int], default: str = "") -> str:
    """The structure the client chose.

    3D Slicer sends ``label`` (the segment's name), OHIF's ``vista3d`` path sends
    ``label_prompt`` = ``[value]`` of the label in the model's ``labels``; OHIF's ``deepgrow``
    path sends neither. Slicer's default segment names (``Segment_1``) name nothing.

    Args:
        params: the infer request.
        labels: the model's label map, name -> value, as ``/info`` shows it.
        default: the structure to assume when the client names none ("" = modality only).

    Raises:
        RequestError: 422 for a ``label_prompt`` that is not a value of ``labels``, or a ``label``
            longer than ``MAX_LABEL_CHARS`` or holding control characters.
    """
    label = params.get("label")
    if isinstance(label, str) and label.strip() and not _UNNAMED_SEGMENT.match(label.strip()):
        name = label.strip()
        if len(name) > MAX_LABEL_CHARS or not name.isprintable():
            # a new name is kept in the label map (model/extra_labels.json): no megabyte or control-character names
            raise RequestError(f"label must be a printable structure name of at most {MAX_LABEL_CHARS} characters, "
                               f"got {len(name)} characters: {name[:40]!r}...")
        return name
    prompt = params.get("label_prompt")
    if not _empty(prompt):
        values = _numbers(prompt if isinstance(prompt, (list, tuple, str)) else [prompt], "label_prompt")
        names = {value: name for name, value in labels.items()}
        if len(values) != 1 or values[0] not in names:
            raise RequestError(f"label_prompt {prompt!r} must be [one value of the model's labels]: "
                               + ", ".join(f"{v}={n}" for v, n in sorted(names.items())))
        return names[values[0]]
    return default
