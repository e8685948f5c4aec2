"""Turn an infer request's ``roi`` / ``slice`` / points into a validated prompt, or a 4xx.

Frames: the image array is indexed as MONAI's ``LoadImage`` returns it, ``(i, j, k)`` for a
volume and ``(i, j)`` for a 2D picture (PIL images come back as ``(width, height)``); ``x``
is ``i``, ``y`` is ``j``, ``z`` is ``k``. ``roi`` = ``[x0, y0, x1, y1, z0, z1]`` in those voxel
indices (MONAI Label's convention, as its SAM2 task reads it), bounds inclusive; each pair is
sorted, so a client that converts a flipped RAS box to indices may send ``x0 > x1``. A box that
sticks out of the image is clipped; one that misses the image is a 422.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException


_ROI_REQUIRED = "roi is required: [x0, y0, x1, y1, z0, z1] in voxel indices of the image"


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
        box_xyxy: ``(x0, y0, x1, y1)`` inclusive voxel indices, clipped to the image.
        z_range: ``(z0, z1)`` inclusive slice range; ``(0, 0)`` for a 2D picture.
        is_3d: True when more than one slice is asked for (3D propagation).
        foreground / background: ``(x, y)`` points on the predicted slice (2D only).
    """

    box_xyxy: tuple[int, int, int, int]
    z_range: tuple[int, int]
    is_3d: bool
    foreground: tuple[tuple[float, float], ...] = ()
    background: tuple[tuple[float, float], ...] = ()

    @property
    def slice_index(self) -> int:
        return self.z_range[0]

    def as_json(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.box_xyxy
        return {"roi": [x0, y0, x1, y1, self.z_range[0], self.z_range[1]], "mode": "3d" if self.is_3d else "2d"}


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
        raise RequestError(f"roi {roi} lies outside the image along {axis} (valid indices 0..{size - 1})")
    return max(low, 0), min(high, size - 1)


def _points(value: Any, name: str, slice_index: int | None, size_xy: tuple[int, int]) -> tuple[tuple[float, float], ...]:
    if value in (None, "", []):
        return ()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise RequestError(f"{name} must be a list of [x, y] or [x, y, z] points, got {value!r}")
    points = []
    for point in value:
        coords = _numbers(point, f"{name} point")
        if len(coords) not in (2, 3):
            raise RequestError(f"{name} point {point!r} must be [x, y] or [x, y, z]")
        if len(coords) == 3 and slice_index is not None and round(coords[2]) != slice_index:
            continue  # a click on another slice does not prompt this one
        if not (0 <= coords[0] <= size_xy[0] - 1 and 0 <= coords[1] <= size_xy[1] - 1):
            raise RequestError(f"{name} point {point!r} is outside the image (x 0..{size_xy[0] - 1}, y 0..{size_xy[1] - 1})")
        points.append((coords[0], coords[1]))
    return tuple(points)


def parse_prompt(params: dict[str, Any], spatial_shape: Sequence[int]) -> Prompt:
    """Validate ``roi``, ``slice`` and points against the loaded image.

    Args:
        params: the infer request (``roi`` required; ``slice``, ``foreground``, ``background``
            optional).
        spatial_shape: ``(X, Y)`` for a 2D picture or ``(X, Y, Z)`` for a volume.

    Raises:
        RequestError: 422 with a message naming the bad field.
    """
    if params.get("roi") in (None, "", []):
        raise RequestError(_ROI_REQUIRED)
    roi = _numbers(params["roi"], "roi")
    if len(roi) not in (4, 6):
        raise RequestError(f"roi must have 4 ([x0, y0, x1, y1]) or 6 ([x0, y0, x1, y1, z0, z1]) numbers, got {len(roi)}")
    size_x, size_y = int(spatial_shape[0]), int(spatial_shape[1])
    x0, x1 = _clipped_pair(roi[0], roi[2], size_x, "x", roi)
    y0, y1 = _clipped_pair(roi[1], roi[3], size_y, "y", roi)

    slice_value = params.get("slice")
    if slice_value in ("", None) or (isinstance(slice_value, (int, float)) and slice_value < 0):
        slice_value = None  # MONAI Label clients send -1 for "no slice"
    if len(spatial_shape) == 2:
        z_range = (0, 0)
    else:
        size_z = int(spatial_shape[2])
        if slice_value is not None:
            try:
                index = int(slice_value)
            except (TypeError, ValueError):
                raise RequestError(f"slice must be an integer, got {slice_value!r}") from None
            if not 0 <= index < size_z:
                raise RequestError(f"slice {index} is outside the image (valid slices 0..{size_z - 1})")
            z_range = (index, index)
        elif len(roi) == 6:
            z_range = _clipped_pair(roi[4], roi[5], size_z, "z", roi)
        else:
            raise RequestError("a 4-number roi on a volume needs `slice`; or send [x0, y0, x1, y1, z0, z1]")
    is_3d = z_range[1] > z_range[0]
    slice_for_points = None if is_3d else z_range[0] if len(spatial_shape) == 3 else None
    return Prompt(
        box_xyxy=(x0, y0, x1, y1),
        z_range=z_range,
        is_3d=is_3d,
        foreground=_points(params.get("foreground"), "foreground", slice_for_points, (size_x, size_y)),
        background=_points(params.get("background"), "background", slice_for_points, (size_x, size_y)),
    )


def check_required(params: dict[str, Any]) -> None:
    """Fail fast, before the image is read, on a request without ``label`` or ``roi``."""
    parse_label(params)
    if params.get("roi") in (None, "", []):
        raise RequestError(_ROI_REQUIRED)


def parse_label(params: dict[str, Any]) -> str:
    """The structure name the client chose (``label``), required.

    Raises:
        RequestError: 422 when missing or not a non-empty string.
    """
    label = params.get("label")
    if not isinstance(label, str) or not label.strip():
        raise RequestError("label is required: the name of the structure to segment, e.g. \"liver\"")
    return label.strip()
