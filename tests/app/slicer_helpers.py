"""Helpers of the tests that drive the server with the stock 3D Slicer plugin's client.

The plugin's own ``MONAILabelLib/client.py`` comes from the installed monailabel wheel
(``<venv>/monailabel/plugins/slicer/``); ``params`` are built as ``MONAILabel.py``'s
``onClickDeepgrow`` + ``getROIPointsXYZ`` build them, and the result is read as the plugin
imports it (voxel value 1 into the selected segment). Voxels are ``(i, j, k)``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np

DEEPGROW = "medsegx"
CT_LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5}
SLICER_PLUGIN = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel"


def load_slicer_client_module() -> ModuleType:
    """The Slicer plugin's ``MONAILabelLib/client.py`` (its own ``MONAILabelClient``, not monailabel.client's)."""
    path = SLICER_PLUGIN / "MONAILabelLib" / "client.py"
    assert path.is_file(), f"the monailabel wheel should install the Slicer plugin at {path}"
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slicer_roi(mask_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> list[int]:
    """``getROIPointsXYZ``: a RAS-aligned ROI around the mask, its min / max corners to IJK."""
    ijk = np.argwhere(mask_ijk)
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    corners = np.array([[i, j, k] for i in (low[0], high[0]) for j in (low[1], high[1]) for k in (low[2], high[2])])
    ras = nib.affines.apply_affine(ijk_to_ras, corners)
    center, size = (ras.min(axis=0) + ras.max(axis=0)) / 2, ras.max(axis=0) - ras.min(axis=0)
    roi_points_ras = [(x - s / 2, x + s / 2) for x, s in zip(center, size)]  # the plugin's own lines
    roi_points_ras = [item for sublist in roi_points_ras for item in sublist]
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    min_points_ras = [roi_points_ras[0], roi_points_ras[2], roi_points_ras[4], 1.0]
    max_points_ras = [roi_points_ras[1], roi_points_ras[3], roi_points_ras[5], 1.0]
    min_points_ijk = [round(i) for i in ras_to_ijk @ min_points_ras]
    max_points_ijk = [round(i) for i in ras_to_ijk @ max_points_ras]
    return [val for pair in zip(min_points_ijk[0:3], max_points_ijk[0:3]) for val in pair]


def slicer_params(slicer, label: str, roi: list[int] | None, foreground=(), background=()) -> dict:
    """``onClickDeepgrow`` for a dimension-3 deepgrow model (no ``slice``; ``roi`` once placed)."""
    info = slicer.info()
    params = {"label": label, "foreground": [list(p) for p in foreground], "background": [list(p) for p in background]}
    config = info["models"][DEEPGROW].get("config", {})
    params.update({k: v[0] if isinstance(v, list) else v for k, v in config.items()})  # getParamsFromConfig
    if roi:
        params["roi"] = roi
    return params


def slicer_segment(result_file: str) -> np.ndarray:
    """What ``ImportLabelmapToSegmentationNode`` puts into the one selected segment: value 1."""
    return np.asarray(nib.load(result_file).dataobj) == 1


def slicer_error(raised: Exception) -> tuple[int, str]:
    """(HTTP status, ``detail``) of the plugin client's ``MONAILabelClientException`` ("Status: 422; Response: ...")."""
    match = re.search(r"Status: (\d+); Response: (.*)", raised.msg, re.S)
    assert match, raised.msg
    body = match.group(2)
    try:
        detail = json.loads(body).get("detail", body)
    except ValueError:
        detail = body
    return int(match.group(1)), str(detail)


def deepest_click(mask_ijk: np.ndarray, k: int) -> list[int]:
    """``[i, j, k]``: the voxel of slice ``k`` of the mask farthest from its edge."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask_ijk[..., k])
    i, j = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [int(i), int(j), int(k)]
