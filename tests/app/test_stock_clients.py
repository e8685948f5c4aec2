"""The stock MONAI Label 0.8.5 clients, unmodified, against the real server.

- 3D Slicer: the plugin's own ``MONAILabelLib/client.py`` imported from the installed wheel
  (``<venv>/monailabel/plugins/slicer/``), with ``params`` built as ``MONAILabel.py``'s
  ``onClickDeepgrow`` + ``getROIPointsXYZ`` build them (an ROI in RAS through the volume's
  RAS-to-IJK matrix, rounded, flattened per axis) and the result read as the plugin imports
  it (voxel value 1 into the selected segment).
- OHIF v3: the parameter dicts of ``PointPrompts.tsx`` (deepgrow and vista3d entries) with
  ``MonaiLabelClient.js``'s query options, the NRRD result read with pynrrd.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from medsegx.metrics import dice

pytestmark = pytest.mark.server

DEEPGROW, VISTA3D = "medsegx", "medsegx_labels"
CT_LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5}
DICE_3D_MIN = 0.85
DICE_CLICK_MIN = 0.80
SLICER_PLUGIN = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel"


@pytest.fixture(scope="module")
def slicer_client_module():
    path = SLICER_PLUGIN / "MONAILabelLib" / "client.py"
    assert path.is_file(), f"the monailabel wheel should install the Slicer plugin at {path}"
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slicer(server, slicer_client_module, tmp_path_factory):
    """The Slicer plugin's ``MONAILabelClient`` (its own class, not monailabel.client's)."""
    return slicer_client_module.MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("slicer")))


@pytest.fixture(scope="module")
def ct_phantom(sample_data):
    image = nib.load(sample_data["images"]["ct_phantom"])
    label = np.asarray(nib.load(sample_data["labels"]["ct_phantom"]).dataobj).astype(np.int16)
    return image, label


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


def flipped_copy(image: nib.Nifti1Image, label: np.ndarray, path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The same scan stored with i and j reversed: the sample CT's x/y-flipping affine becomes a diagonal one."""
    data = np.asarray(image.dataobj)[::-1, ::-1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    affine = image.affine @ flip
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path, label[::-1, ::-1], affine


def deepest_click(mask_ijk: np.ndarray, k: int) -> list[int]:
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask_ijk[..., k])
    i, j = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [int(i), int(j), int(k)]


def test_info_lists_the_models_both_clients_show(slicer):
    info = slicer.info()
    models = info["models"]
    assert models[DEEPGROW]["type"] in ("deepgrow", "deepedit")  # MONAILabel.py updateSelector
    assert models[DEEPGROW]["dimension"] == 3
    assert models[VISTA3D]["type"] == "vista3d"  # MonaiLabelPanel.tsx onInfo
    labels = models[VISTA3D]["labels"]
    assert 0 < len(labels) <= 30 and max(labels.values()) <= 255
    # MONAILabel.py initSample: Next Sample auto-runs a segmentation model when a top-level
    # label is one of a model's labels; with no segmentation model that is an error popup.
    auto_run = [label for label in info.get("labels", []) for m in models.values() if label in m.get("labels", [])]
    assert auto_run == []


def test_slicer_3d_roi_on_datastore_image(slicer, ct_phantom):
    image, label = ct_phantom
    kidney = label == CT_LABELS["kidney_left"]
    roi = slicer_roi(kidney, image.affine)
    assert np.all(np.diag(image.affine)[:2] < 0)  # the sample CT flips x and y, as DICOM-derived CT does
    assert roi[0] > roi[1] and roi[2] > roi[3], roi  # so getROIPointsXYZ gives the i and j pairs reversed
    result_file, result = slicer.infer(DEEPGROW, "ct_phantom", slicer_params(slicer, "kidney_left", roi))

    segment = slicer_segment(result_file)
    assert segment.shape == kidney.shape
    np.testing.assert_allclose(nib.load(result_file).affine, image.affine, atol=1e-4)
    assert dice(segment, kidney) >= DICE_3D_MIN, result
    assert result["taxonomy_path"][-1] == "LeftKidney" and result["mode"] == "3d"
    assert result["label"] == "kidney_left" and result["result_value"] == 1


def test_slicer_3d_roi_on_an_uploaded_volume_with_a_diagonal_affine(slicer, ct_phantom, tmp_path):
    """An uploaded volume (a Slicer session) with a positive diagonal affine: ROI pairs come sorted."""
    image, label = ct_phantom
    path, label_flipped, affine = flipped_copy(image, label, tmp_path / "flipped.nii.gz")
    kidney = label_flipped == CT_LABELS["kidney_right"]
    roi = slicer_roi(kidney, affine)
    assert roi[0] < roi[1] and roi[2] < roi[3], roi
    session = slicer.create_session(str(path))
    result_file, result = slicer.infer(DEEPGROW, "", slicer_params(slicer, "kidney_right", roi),
                                       session_id=session["session_id"])

    segment = slicer_segment(result_file)
    np.testing.assert_allclose(nib.load(result_file).affine, affine, atol=1e-4)
    assert dice(segment, kidney) >= DICE_3D_MIN, result


def test_slicer_auto_run_click_before_any_roi(slicer, ct_phantom):
    """The first click of a segment (auto-run on): label + foreground, no roi, no slice."""
    _, label = ct_phantom
    kidney = label == CT_LABELS["kidney_left"]
    k = int(np.flatnonzero(kidney.any(axis=(0, 1))).mean())
    click = deepest_click(kidney, k)
    result_file, result = slicer.infer(DEEPGROW, "ct_phantom", slicer_params(slicer, "kidney_left", None, [click]))

    segment = slicer_segment(result_file)
    assert segment[tuple(click)], "the clicked voxel is in the mask"
    assert dice(segment[..., k], kidney[..., k]) >= DICE_CLICK_MIN, result
    assert result["mode"] == "3d" and segment.any(axis=(0, 1)).sum() > 1  # propagated from the clicked slice


def ohif_infer(server, model: str, image_id: str, params: dict, output: str = "image") -> requests.Response:
    """``MonaiLabelClient.js`` infer: query image + output, form field params, NRRD uint8 options."""
    params = dict(params, result_extension=".nrrd", result_dtype="uint8", result_compress=False,
                  restore_label_idx=False)
    response = requests.post(f"{server.url}/infer/{model}", params={"image": image_id, "output": output},
                             files={"params": (None, json.dumps(params))}, timeout=600)
    assert response.status_code == 200, response.text[:500]
    return response


def read_nrrd(content: bytes, tmp_path: Path) -> np.ndarray:
    import nrrd

    path = tmp_path / "result.nrrd"
    path.write_bytes(content)
    data, header = nrrd.read(str(path))
    assert data.dtype == np.uint8
    return data


def test_ohif_deepgrow_one_click(server, ct_phantom, tmp_path):
    _, label = ct_phantom
    kidney = label == CT_LABELS["kidney_right"]
    k = int(np.flatnonzero(kidney.any(axis=(0, 1))).mean())
    click = deepest_click(kidney, k)
    response = ohif_infer(server, DEEPGROW, "ct_phantom", {"foreground": [click], "background": []})

    data = read_nrrd(response.content, tmp_path)
    assert data.shape == kidney.shape
    assert dice(data[..., k] > 0, kidney[..., k]) >= DICE_CLICK_MIN


def test_ohif_vista3d_passes_the_chosen_label(server, ct_phantom, tmp_path):
    _, label = ct_phantom
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    labels = info["models"][VISTA3D]["labels"]
    kidney = label == CT_LABELS["kidney_left"]
    k = int(np.flatnonzero(kidney.any(axis=(0, 1))).mean())
    click = deepest_click(kidney, k)
    params = {"points": [click], "point_labels": [1], "label_prompt": [labels["kidney_left"]]}  # PointPrompts.tsx
    data = read_nrrd(ohif_infer(server, VISTA3D, "ct_phantom", params).content, tmp_path)

    assert set(np.unique(data)) <= {0, labels["kidney_left"]}  # updateView maps this value to the label
    assert dice(data[..., k] == labels["kidney_left"], kidney[..., k]) >= DICE_CLICK_MIN
    result = json.loads(ohif_infer(server, VISTA3D, "ct_phantom", params, output="json").text)
    assert result["label"] == "kidney_left" and result["taxonomy_path"][-1] == "LeftKidney"


def test_ohif_deepgrow_without_a_label_uses_the_modality_context(server, ct_phantom):
    _, label = ct_phantom
    kidney = label == CT_LABELS["kidney_left"]
    k = int(np.flatnonzero(kidney.any(axis=(0, 1))).mean())
    response = ohif_infer(server, DEEPGROW, "ct_phantom", {"foreground": [deepest_click(kidney, k)]}, output="json")
    result = response.json()
    assert result["label"] == "" and result["label_index"] is None
    assert result["taxonomy_path"] == ["CT"] and result["voxels"] > 0
