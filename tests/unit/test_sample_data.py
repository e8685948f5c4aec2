"""Tests for sample-data/build_sample_data.py: layout, geometry, label values and DICOM round trip."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

BUILDER_PATH = Path(__file__).resolve().parents[2] / "sample-data" / "build_sample_data.py"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_sample_data", BUILDER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
CT_LABELS = builder.CT_LABELS


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """One build shared by the module (about 5 s on two CPU cores)."""
    return builder.build(tmp_path_factory.mktemp("sample-data") / "datastore")


def _data(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _md5(path: str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_datastore_layout(built):
    datastore = Path(built["datastore"])
    assert built["built"] is True
    for name, image in built["images"].items():
        assert Path(image).parent == datastore, name
    for name, label in built["labels"].items():
        assert Path(label).parent == datastore / "labels" / "final"
        assert Path(label).name == Path(built["images"][name]).name
    # Active learning needs unlabelled work: the unlabelled phantom has ground truth only outside the datastore.
    assert not (datastore / "labels" / "final" / "ct_phantom_unlabelled.nii.gz").exists()
    for truth in built["ground_truth"].values():
        assert not Path(truth).is_relative_to(datastore)
        assert Path(truth).exists()
    assert json.loads(Path(built["label_map_files"]["ct_phantom"]).read_text()) == CT_LABELS
    assert built["label_maps"]["ct_phantom"] == CT_LABELS


@pytest.mark.parametrize(
    ("image_key", "label_path_key"),
    [("ct_phantom", ("labels", "ct_phantom")), ("ct_phantom_unlabelled", ("ground_truth", "ct_phantom_unlabelled"))],
)
def test_ct_phantom_nifti(built, image_key, label_path_key):
    image = nib.load(built["images"][image_key])
    label_image = nib.load(built[label_path_key[0]][label_path_key[1]])
    hu, label = np.asarray(image.dataobj), np.asarray(label_image.dataobj)

    assert hu.shape == label.shape == builder.CT_SHAPE
    assert hu.dtype == np.int16 and label.dtype == np.uint8
    assert image.header.get_zooms() == pytest.approx(builder.CT_SPACING)
    np.testing.assert_allclose(image.affine, builder.ct_affine(builder.CT_SHAPE, builder.CT_SPACING))
    np.testing.assert_allclose(label_image.affine, image.affine)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # DICOM axial layout, see ct_affine

    assert -1024 <= hu.min() and hu.max() < 3072
    assert np.median(hu[0, 0, :]) == pytest.approx(-1000, abs=40)  # corner voxels are air
    assert set(np.unique(label)) == {0, *CT_LABELS.values()}

    middle = label[:, :, label.shape[2] // 2]
    for organ, index in CT_LABELS.items():
        assert (middle == index).sum() > 20, f"{organ} missing on the middle slice"
    # Shapes change along z: the liver's cross-section is not the same on every slice.
    liver_areas = (label == CT_LABELS["liver"]).sum(axis=(0, 1))
    assert len(set(liver_areas.tolist())) > 10

    # Anatomy in world (RAS) coordinates: +x is the patient's right.
    def centroid_x(organ: str) -> float:
        voxels = np.argwhere(label == CT_LABELS[organ])
        return float(nib.affines.apply_affine(image.affine, voxels)[:, 0].mean())

    assert centroid_x("liver") > 20 and centroid_x("kidney_right") > 20
    assert centroid_x("spleen") < -20 and centroid_x("kidney_left") < -20

    medians = {organ: np.median(hu[label == index]) for organ, index in CT_LABELS.items()}
    assert medians["liver"] == pytest.approx(builder.HU["liver"], abs=15)
    assert medians["spleen"] == pytest.approx(builder.HU["spleen"], abs=15)
    assert medians["aorta"] == pytest.approx(builder.HU["aorta"], abs=30)
    assert 100 < medians["kidney_left"] < 180 and 100 < medians["kidney_right"] < 180


def test_make_ct_phantom_is_seeded():
    shape = (48, 48, 8)
    first, second, other = (builder.make_ct_phantom(seed, shape) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("reader_name", ["ITKReader", "PydicomReader"])
def test_dicom_series_matches_its_phantom(built, reader_name):
    monai_data = pytest.importorskip("monai.data")
    from monai.transforms import LoadImage

    series_dir = built["dicom_series"]["ct_phantom_2"]
    loaded = LoadImage(reader=getattr(monai_data, reader_name)(), image_only=True)(series_dir)
    hu, label, affine = builder.make_ct_phantom(built["seeds"]["ct_phantom_2"])

    assert tuple(loaded.shape) == builder.CT_SHAPE
    np.testing.assert_array_equal(np.asarray(loaded), hu)
    np.testing.assert_allclose(np.asarray(loaded.affine), affine, atol=1e-3)
    truth = nib.load(built["ground_truth"]["ct_phantom_2"])
    np.testing.assert_array_equal(np.asarray(truth.dataobj), label)
    np.testing.assert_allclose(truth.affine, affine)


def test_dicom_series_headers(built):
    pydicom = pytest.importorskip("pydicom")
    files = sorted(Path(built["dicom_series"]["ct_phantom_2"]).glob("*.dcm"))
    assert len(files) == builder.CT_SHAPE[2]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    assert {ds.Modality for ds in headers} == {"CT"}
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert len({ds.SOPInstanceUID for ds in headers}) == len(files)
    z_positions = [float(ds.ImagePositionPatient[2]) for ds in headers]
    assert np.allclose(np.diff(z_positions), builder.CT_SPACING[2])
    assert [float(v) for v in headers[0].PixelSpacing] == [builder.CT_SPACING[1], builder.CT_SPACING[0]]
    assert float(headers[0].RescaleIntercept) == -1024 and float(headers[0].RescaleSlope) == 1


def test_mni152(built):
    image = nib.load(built["images"]["mni152_t1"])
    intensity = np.asarray(image.dataobj)
    tissue = _data(built["labels"]["mni152_t1"])
    brain = _data(built["extra_labels"]["mni152_t1_brain_mask"])

    assert intensity.shape == tissue.shape == brain.shape == (99, 117, 95)
    assert intensity.dtype == np.int16 and 0 <= intensity.min() and intensity.max() <= 1000
    assert image.header.get_zooms() == pytest.approx((2.0, 2.0, 2.0))
    assert set(np.unique(tissue)) == {0, 1, 2} and set(np.unique(brain)) == {0, 1}
    assert np.all(brain[tissue > 0] == 1)
    grey, white = builder.MNI152_LABELS["grey_matter"], builder.MNI152_LABELS["white_matter"]
    assert np.median(intensity[tissue == white]) > np.median(intensity[tissue == grey])  # T1 contrast


def test_ct_slice_2d(built):
    from PIL import Image

    image = Image.open(built["images"]["ct_slice_2d"])
    label = np.asarray(Image.open(built["labels"]["ct_slice_2d"]))
    assert image.mode == "L" and image.size == (256, 256)
    assert label.shape == (256, 256) and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, *CT_LABELS.values()}


def test_rebuild_is_skipped_then_forced_identically(built):
    datastore = built["datastore"]
    files = [*built["images"].values(), *built["labels"].values(), *built["ground_truth"].values()]
    before = {path: _md5(path) for path in files}

    again = builder.build(datastore)
    assert again["built"] is False
    assert again["images"] == built["images"]

    forced = builder.build(datastore, force=True)
    assert forced["built"] is True
    assert {path: _md5(path) for path in files} == before


def test_pydicom_testdata_on_request(built):
    pydicom = pytest.importorskip("pydicom")
    result = builder.build(built["datastore"], include_pydicom_testdata=True)
    assert set(result["pydicom_testdata"]) == {"CT_small.dcm", "MR_small.dcm"}
    assert pydicom.dcmread(result["pydicom_testdata"]["CT_small.dcm"]).Modality == "CT"
    assert pydicom.dcmread(result["pydicom_testdata"]["MR_small.dcm"]).Modality == "MR"
