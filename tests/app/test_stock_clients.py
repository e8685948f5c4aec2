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

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from medsegx.metrics import dice
from slicer_helpers import CT_LABELS, DEEPGROW, deepest_click, slicer_params, slicer_roi, slicer_segment

pytestmark = pytest.mark.server

VISTA3D = "medsegx_labels"
DICE_3D_MIN = 0.85
DICE_CLICK_MIN = 0.80


def flipped_copy(image: nib.Nifti1Image, label: np.ndarray, path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The same scan stored with i and j reversed: the sample CT's x/y-flipping affine becomes a diagonal one."""
    data = np.asarray(image.dataobj)[::-1, ::-1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    affine = image.affine @ flip
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path, label[::-1, ::-1], affine


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
