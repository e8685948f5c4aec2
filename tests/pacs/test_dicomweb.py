"""The app on a real PACS: a MONAI Label server with ``--studies <Orthanc>/dicom-web``.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started by ``scripts/pacs.sh serve`` on a
free loopback port) holds the sample CT phantom series and the MNI152 MR series
(``tests/conftest.py``: ``orthanc``, ``pacs_server``). Checked here:

- modality survives DICOMweb: the CT series is prepared as CT, the MR series as MR, both from
  the series' DICOM ``Modality`` tag (``modality_source == "dicom"``), not from intensities;
- ``PUT /datastore/label`` (what both clients call on Save/Submit) stores a DICOM-SEG in
  Orthanc that references the source series, one segment per label value named after it;
  fetched back through DICOMweb and decoded with pydicom-seg, its voxels and geometry are the
  saved mask's;
- a second save adds a second SEG version (MONAI Label's DICOMweb datastore never deletes);
  the newest one is the image's final label, also for a fresh cache; no other instance in
  the PACS changes.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from pacs_helpers import click_on, fetch_seg, orthanc_instances, seg_on_grid, seg_series

pytestmark = [pytest.mark.server, pytest.mark.pacs]

MODEL = "medsegx"
CT_NAMES = {"liver": 1, "spleen": 2}  # values of the sample ground truth (ct_phantom_labels.json)


@pytest.fixture(scope="module")
def client(pacs_server):
    return pacs_server.client()


@pytest.fixture(scope="module")
def series(orthanc) -> dict[str, str]:
    return {"CT": orthanc.series_uid("CT"), "MR": orthanc.series_uid("MR")}


@pytest.mark.parametrize("modality, expected, sample, value",
                         [("CT", "CT", "ct_phantom_2", 1), ("MR", "MRI", "mni152_t1_dicom", 2)])
def test_modality_comes_from_the_series_dicom_metadata(client, series, sample_data, modality, expected, sample, value):
    click = click_on(sample_data["ground_truth"][sample], value)
    _, result = client.infer(MODEL, series[modality], {"foreground": [click], "propagate": False})

    assert result["modality"] == expected
    assert result["modality_source"] == "dicom"  # the series' (0008,0060) tag, not the intensities
    assert result["voxels"] > 0


def saved_at(orthanc, seg: dict) -> str:
    """SeriesDate + SeriesTime of a SEG series (from its metadata; QIDO leaves them out)."""
    meta = requests.get(f"{orthanc.dicomweb}/studies/{seg['0020000D']['Value'][0]}/series/"
                        f"{seg['0020000E']['Value'][0]}/metadata", timeout=30).json()[0]
    return meta["00080021"]["Value"][0] + meta["00080031"]["Value"][0]


def save_final(client, image_id: str, label_file: Path, label_info: list[dict]) -> dict:
    return client.save_label(image_id, str(label_file), tag="final", params={"label_info": label_info})


def test_final_label_is_stored_in_orthanc_as_dicom_seg(client, pacs_server, orthanc, series, sample_data, tmp_path):
    truth = nib.load(sample_data["ground_truth"]["ct_phantom_2"])
    values = np.asarray(truth.dataobj)
    mask = np.where(np.isin(values, list(CT_NAMES.values())), values, 0).astype(np.uint8)
    label_file = tmp_path / "liver_spleen.nii.gz"
    nib.save(nib.Nifti1Image(mask, truth.affine), label_file)
    before = orthanc_instances(orthanc)
    segs_before = seg_series(orthanc)

    # entries out of value order: MONAI Label 0.8.5 alone would name value 1 "spleen" (COMPAT #7)
    started = time.perf_counter()
    save_final(client, series["CT"], label_file, [{"name": "spleen", "idx": 2}, {"name": "liver", "idx": 1}])
    save_s = time.perf_counter() - started

    segs = [s for s in seg_series(orthanc) if s not in segs_before]
    assert len(segs) == 1
    assert orthanc_instances(orthanc) - before and before <= orthanc_instances(orthanc)
    dataset = fetch_seg(orthanc, segs[0]["0020000D"]["Value"][0], segs[0]["0020000E"]["Value"][0])
    assert dataset.Modality == "SEG"
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series["CT"]
    ct_study = requests.get(f"{orthanc.dicomweb}/series", params={"SeriesInstanceUID": series["CT"]},
                            timeout=30).json()[0]["0020000D"]["Value"][0]
    assert dataset.StudyInstanceUID == ct_study
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in dataset.SegmentSequence}
    assert segments == {1: "liver", 2: "spleen"}

    decoded = seg_on_grid(dataset, nib.load(label_file))
    np.testing.assert_array_equal(decoded, mask)  # segment numbers are the saved values here
    print(f"\nlabel save to DICOM-SEG (liver + spleen, {len(dataset.PerFrameFunctionalGroupsSequence)} frames): "
          f"{save_s:.2f} s")


def test_second_save_adds_a_version_and_the_newest_is_the_final_label(client, pacs_server, orthanc, series,
                                                                     sample_data, tmp_path):
    earlier = seg_series(orthanc)
    assert earlier, "runs after test_final_label_is_stored_in_orthanc_as_dicom_seg"
    last_saved = max(saved_at(orthanc, seg) for seg in earlier)
    untouched = orthanc_instances(orthanc)

    truth = nib.load(sample_data["ground_truth"]["ct_phantom_2"])
    liver = (np.asarray(truth.dataobj) == CT_NAMES["liver"]).astype(np.uint8)
    label_file = tmp_path / "liver.nii.gz"
    nib.save(nib.Nifti1Image(liver, truth.affine), label_file)
    # dcmqi stamps SeriesDate/SeriesTime to the second; a later second makes "newest" unambiguous
    while time.strftime("%Y%m%d%H%M%S") <= last_saved:
        time.sleep(0.05)
    save_final(client, series["CT"], label_file, [{"name": "liver", "idx": 1}])

    assert len(seg_series(orthanc)) == len(earlier) + 1  # versioned, as MONAI Label's datastore does
    after = orthanc_instances(orthanc)
    assert untouched < after and len(after - untouched) == 1  # the new SEG instance, nothing else

    served = tmp_path / "served.nii.gz"
    response = requests.get(f"{pacs_server.url}/datastore/label", params={"label": series["CT"], "tag": "final"},
                            timeout=60)
    assert response.status_code == 200
    served.write_bytes(response.content)
    np.testing.assert_array_equal(np.asarray(nib.load(served).dataobj), liver)

    # a fresh cache (another server, a new machine) reads the newest SEG back onto the image grid
    from lib.dicomweb import PACSDatastore
    from monailabel.datastore.dicom import DICOMWebDatastore, DICOMwebClientX

    store = PACSDatastore.adopt(DICOMWebDatastore(DICOMwebClientX(url=orthanc.dicomweb), {"Modality": "CT,MR"},
                                                  cache_path=str(tmp_path / "fresh-cache")), {})
    try:
        assert store.get_labeled_images() == [series["CT"]]
        fresh = nib.load(store.get_label_uri(series["CT"], "final"))
        np.testing.assert_array_equal(np.asarray(fresh.dataobj), liver)
        np.testing.assert_allclose(fresh.affine, nib.load(store.get_image_uri(series["CT"])).affine, atol=1e-4)
        assert [entry["name"] for entry in store.get_label_info(series["CT"], "final")["label_info"]] == ["liver"]
    finally:
        store._observer.stop()
    assert orthanc_instances(orthanc) == after


def test_an_empty_final_label_is_kept_in_the_cache_and_not_sent(client, orthanc, series, sample_data, tmp_path):
    truth = nib.load(sample_data["ground_truth"]["mni152_t1_dicom"])
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(truth.shape, np.uint8), truth.affine), empty)
    before = orthanc_instances(orthanc)

    save_final(client, series["MR"], empty, [])  # 0.8.5 alone: FileNotFoundError '' (no SEG to upload)

    assert orthanc_instances(orthanc) == before
