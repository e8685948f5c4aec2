"""Hostile input against a real server: only its own studies are read, bad files and params get a 4xx.

One server for the module with its own tiny studies folder and small limits
(``--conf max_voxels 100000 --conf max_upload_mb 1``), so nothing here touches the shared
server's datastore. Every image is a few kilobytes and every valid prompt is one slice: no 3D
propagation runs. ``docs/MONAILABEL_COMPAT.md`` #8 describes what is checked where.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import time
import zipfile

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.server

MODEL = "medsegx"
MAX_VOXELS = 100_000
MAX_UPLOAD_MB = 1
TINY_SHAPE = (32, 32, 3)
TINY_ROI = [8, 20, 8, 20, 1, 1]  # one slice of the tiny volume
REQUEST_TIMEOUT_S = 60  # each hostile request must be answered well within this


def _nifti_bytes(array: np.ndarray, gz: bool = True) -> bytes:
    image = nib.Nifti1Image(array, np.eye(4))
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw


def _tiny_ct() -> np.ndarray:
    rng = np.random.default_rng(0)
    volume = rng.normal(-800, 30, TINY_SHAPE)
    volume[8:21, 8:21, :] = rng.normal(60, 10, (13, 13, TINY_SHAPE[2]))  # a bright block: something to segment
    return volume.astype(np.int16)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, server_launcher):
    """A server whose studies hold ``tiny`` and ``escape`` (a symlink to a file outside the studies)."""
    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.nii.gz"
    secret.write_bytes(_nifti_bytes(_tiny_ct()))
    studies = root / "studies"
    studies.mkdir()
    (studies / "tiny.nii.gz").write_bytes(_nifti_bytes(_tiny_ct()))
    os.symlink(secret, studies / "escape.nii.gz")
    servers = server_launcher.serve(root, studies, "--conf", "max_voxels", str(MAX_VOXELS),
                                    "--conf", "max_upload_mb", str(MAX_UPLOAD_MB), "--conf", "tracking", "none")
    with pytest.MonkeyPatch.context() as patch:  # read by the server process when it starts
        patch.setenv("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")  # no scoring run: these tests need no scores
        server = next(servers)
    server.root, server.studies, server.outside = root, studies, outside
    yield server
    servers.close()


#: (what was sent, status, detail, seconds) of every request, printed at the end (``pytest -s``).
ANSWERS: list[tuple[str, int, str, float]] = []


@pytest.fixture(scope="module", autouse=True)
def answers_table():
    yield
    print("\nhostile inputs and their answers:")
    for sent, status, message, seconds in ANSWERS:
        print(f"  {status}  {seconds:5.2f} s  {sent[:90]}  ->  {message[:160]}")


def post_infer(server, query: str = "image=tiny", params=None, files=None, raw_params: str | None = None):
    """``POST /infer/medsegx?<query>``; ``query`` is sent as written (already URL-encoded)."""
    text = raw_params if raw_params is not None else json.dumps({"roi": TINY_ROI} if params is None else params)
    started = time.monotonic()
    response = requests.post(f"{server.url}/infer/{MODEL}?{query}&output=json", data={"params": text}, files=files,
                             timeout=REQUEST_TIMEOUT_S)
    response.elapsed_s = time.monotonic() - started
    uploaded = f" file={files['file'][0]}" if files else ""
    ANSWERS.append((f"?{query}{uploaded} params={text[:60]}", response.status_code,
                    detail(response) if response.status_code >= 400 else "ok", response.elapsed_s))
    return response


def detail(response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text


def assert_refused(response, statuses: tuple[int, ...], words: str) -> None:
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert words.lower() in detail(response).lower(), detail(response)


def test_a_datastore_id_is_served(hostile):
    response = post_infer(hostile, params={"roi": TINY_ROI, "label": "liver"})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["mode"] == "2d"


# --------------------------------------------------------------------------- only its own studies


@pytest.mark.parametrize(
    "query, statuses, words",
    [
        ("image=/etc/passwd", (403,), "not a plain name"),
        ("image=%2Fetc%2Fpasswd", (403,), "not a plain name"),  # URL-encoded: decoded before the check
        ("image=..%2Foutside%2Fsecret", (403,), "not a plain name"),
        ("image=tiny%2F..%2F..%2Foutside%2Fsecret", (403,), "not a plain name"),
        ("image=..", (403,), "not a plain name"),
        ("image=%252Fetc%252Fpasswd", (404,), "not in the datastore"),  # double-encoded: a name, not listed
        ("image=escape", (403,), "outside the studies"),  # a symlink in the studies pointing out of them
        ("image=nothing_here", (404,), "not in the datastore"),
        ("image=server.log", (403,), "working directory"),  # upstream reads a relative path from the server's cwd
        ("image=outside", (403,), "working directory"),
        ("image=&session_id=..%2F..%2Fetc", (403,), "not a plain name"),
        ("image=&session_id=0f1e2d3c-0000-11ef-8000-000000000000", (404,), "session"),
        ("image=", (422,), "no image"),
    ],
)
def test_only_the_servers_own_studies(hostile, query, statuses, words):
    assert_refused(post_infer(hostile, query), statuses, words)


def test_an_absolute_path_that_exists_is_refused(hostile):
    secret = hostile.outside / "secret.nii.gz"
    assert_refused(post_infer(hostile, f"image={secret}"), (403,), "not a plain name")
    assert_refused(post_infer(hostile, f"image={hostile.studies / 'tiny.nii.gz'}"), (403,), "not a plain name")


def test_params_cannot_swap_the_image(hostile):
    # upstream merges params into the request after `image`: params.image would replace it
    response = post_infer(hostile, params={"roi": TINY_ROI, "image": str(hostile.outside / "secret.nii.gz")})
    assert_refused(response, (422,), "params.image")
    upload = {"file": ("tiny.nii.gz", _nifti_bytes(_tiny_ct()))}
    response = post_infer(hostile, "image=", params={"roi": TINY_ROI, "image": "/etc/passwd"}, files=upload)
    assert_refused(response, (422,), "params.image")


def test_datastore_endpoints_stay_in_the_studies(hostile):
    url = hostile.url
    assert requests.get(f"{url}/datastore/image", params={"image": "tiny"}, timeout=30).status_code == 200
    for image in ("escape", "../outside/secret", str(hostile.outside / "secret")):
        response = requests.get(f"{url}/datastore/image", params={"image": image}, timeout=30)
        assert response.status_code == 404, (image, response.status_code)
        assert requests.head(f"{url}/datastore/image", params={"image": image}, timeout=30).status_code == 404
    label = _nifti_bytes(np.zeros(TINY_SHAPE, np.uint8))
    for tag in ("../../../outside/evil", "/tmp/evil", ".."):
        response = requests.put(f"{url}/datastore/label", params={"image": "tiny", "tag": tag},
                                files={"label": ("tiny.nii.gz", label)}, timeout=30)
        assert_refused(response, (403,), "label tag")
    response = requests.put(f"{url}/datastore/label", params={"image": "nothing_here", "tag": "final"},
                            files={"label": ("nothing_here.nii.gz", label)}, timeout=30)
    assert_refused(response, (404,), "not in the datastore")
    response = requests.put(f"{url}/datastore/image", params={"image": "../outside/evil"},
                            files={"file": ("evil.nii.gz", label)}, timeout=30)
    assert_refused(response, (403,), "image id")
    response = requests.get(f"{url}/datastore/label", params={"label": "escape", "tag": "final"}, timeout=30)
    assert response.status_code == 404
    assert sorted(path.name for path in hostile.outside.iterdir()) == ["secret.nii.gz"]  # nothing written outside
    assert not (hostile.root / "evil.nii.gz").exists()


# --------------------------------------------------------------------------- hostile files


def _huge_header_nifti() -> bytes:
    header = nib.Nifti2Header()  # NIfTI-2: 64-bit dims
    header.set_data_dtype(np.uint8)
    header.set_data_shape((100_000, 100_000, 1000))  # 10^13 voxels claimed; no data follows
    header["vox_offset"] = 544
    return header.binaryblock + b"\0" * 4


def _huge_header_nifti1_gz() -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((30_000, 30_000, 1000))  # NIfTI-1 dims are int16
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 65536)


def _truncated_nifti() -> bytes:
    whole = _nifti_bytes(np.random.default_rng(1).normal(0, 100, (40, 40, 20)).astype(np.float32))
    return whole[: len(whole) // 2]


def _nan_nifti() -> bytes:
    volume = _tiny_ct().astype(np.float32)
    volume[3, 4, 1] = np.nan
    volume[5, 6, 2] = np.inf
    return _nifti_bytes(volume)


def _png16() -> bytes:
    stream = io.BytesIO()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(stream, format="PNG")
    return stream.getvalue()


@pytest.mark.parametrize(
    "name, make, params, statuses, words",
    [
        ("huge.nii", _huge_header_nifti, {"roi": TINY_ROI}, (413,), "voxels"),
        ("huge.nii.gz", _huge_header_nifti1_gz, {"roi": TINY_ROI}, (413,), "voxels"),
        ("over_limit.nii.gz", lambda: _nifti_bytes(np.zeros((64, 64, 32), np.int16)), {"roi": TINY_ROI}, (413,),
         "max_voxels"),
        ("truncated.nii.gz", _truncated_nifti, {"roi": TINY_ROI}, (422,), "cannot read image"),
        ("garbage.nii.gz", lambda: b"\x1f\x8b not gzip at all" * 10, {"roi": TINY_ROI}, (422,), "nifti"),
        ("four_d.nii.gz", lambda: _nifti_bytes(np.zeros((16, 16, 4, 2), np.int16)), {"roi": TINY_ROI}, (422,),
         "one 3D volume"),
        ("nan.nii.gz", _nan_nifti, {"roi": TINY_ROI}, (422,), "NaN or infinite"),
        ("sixteen.png", _png16, {"roi": [2, 20, 2, 20], "modality": "CT"}, (422,), "16-bit"),
        ("image.mha", lambda: b"ObjectType = Image\nDimSize = 100000 100000 1000\n", {"roi": TINY_ROI}, (415,),
         "not read here"),
    ],
)
def test_hostile_files_are_refused_before_loading(hostile, name, make, params, statuses, words):
    response = post_infer(hostile, "image=", params=params, files={"file": (name, make())})
    assert_refused(response, statuses, words)
    assert response.elapsed_s < 30


def test_an_upload_above_the_limit_is_refused_before_it_is_read(hostile):
    too_big = b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1024)
    response = post_infer(hostile, "image=", files={"file": ("big.nii", too_big)})
    assert_refused(response, (413,), "max_upload_mb")

    boundary = "hostile-boundary"

    def chunked_form():  # no Content-Length: the body is counted as it arrives
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.nii\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(2 * MAX_UPLOAD_MB * 16):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = requests.put(f"{hostile.url}/datastore/image?image=chunked", data=chunked_form(),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                            timeout=REQUEST_TIMEOUT_S)
    assert_refused(response, (413,), "max_upload_mb")
    assert requests.head(f"{hostile.url}/datastore/image", params={"image": "chunked"}, timeout=30).status_code == 404


def test_a_dicom_folder_mixing_series_is_refused(hostile, sample_data, tmp_path):
    from monailabel.client.client import MONAILabelUtils

    files = []
    for name in ("ct_phantom_2", "mni152_t1"):  # one slice of a CT and one of an MR series
        first = sorted(os.scandir(sample_data["dicom_series"][name]), key=lambda entry: entry.name)[0]
        files.append(str(shutil.copy(first.path, tmp_path / f"{name}.dcm")))
    status, body, _ = MONAILabelUtils.http_upload("PUT", hostile.url, "/session/", {}, files)
    assert status == 200, body
    session_id = json.loads(body)["session_id"]
    assert_refused(post_infer(hostile, f"image=&session_id={session_id}"), (422,), "mixes 2 series")


def _zip(members: dict[str, bytes]) -> bytes:
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return stream.getvalue()


def _tar_with_link() -> bytes:
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w:gz") as archive:
        link = tarfile.TarInfo("series/escape.dcm")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return stream.getvalue()


@pytest.mark.parametrize(
    "name, make, status, words",
    [
        ("bomb.zip", lambda: _zip({"zeros.nii": b"\0" * (3 * MAX_UPLOAD_MB * 1024 * 1024)}), 413, "unpacks to more"),
        ("slip.zip", lambda: _zip({"../../evil.nii": b"x"}), 403, "outside the session folder"),
        ("absolute.zip", lambda: _zip({"/tmp/evil.nii": b"x"}), 403, "outside the session folder"),
        ("link.tar.gz", _tar_with_link, 403, "link or device"),
        ("plain.nii.gz", lambda: _nifti_bytes(_tiny_ct()), 415, "zip or tar"),
    ],
)
def test_session_archives_are_checked_before_unpacking(hostile, name, make, status, words):
    payload = make()
    assert len(payload) < MAX_UPLOAD_MB * 1024 * 1024  # small on the wire: the upload limit does not apply
    response = requests.put(f"{hostile.url}/session/", params={"uncompress": "true"},
                            files=[("files", (name, payload))], timeout=REQUEST_TIMEOUT_S)
    ANSWERS.append((f"PUT /session/?uncompress=true {name}", response.status_code, detail(response), 0.0))
    assert_refused(response, (status,), words)


def test_a_small_zip_still_makes_a_session(hostile):
    response = requests.put(f"{hostile.url}/session/", params={"uncompress": "true"},
                            files=[("files", ("tiny.zip", _zip({"tiny.nii.gz": _nifti_bytes(_tiny_ct())})))],
                            timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["session_id"]


def test_a_dicom_series_missing_slices_is_refused(hostile, sample_data, tmp_path):
    from monailabel.client.client import MONAILabelUtils

    files = sorted(str(path) for path in Path(sample_data["dicom_series"]["ct_phantom_2"]).glob("*.dcm"))
    positions = [float(pydicom.dcmread(file, stop_before_pixels=True).ImagePositionPatient[2]) for file in files]
    in_space_order = [file for _, file in sorted(zip(positions, files))]
    kept = in_space_order[10:13] + in_space_order[15:18]  # six slices (under 1 MB), two lost between them
    status, body, _ = MONAILabelUtils.http_upload("PUT", hostile.url, "/session/", {}, kept)
    assert status == 200, body
    session_id = json.loads(body)["session_id"]
    assert_refused(post_infer(hostile, f"image=&session_id={session_id}"), (422,), "misses slices")


# --------------------------------------------------------------------------- fuzzed params

FUZZ = [
    ({"roi": [8, 20, 8, 20, 1, 1], "zzz_unknown": {"a": [1, 2]}, "another": None}, (200,)),  # unknown keys: ignored
    ({"roi": [20, 8, 20, 8, 1, 1]}, (200,)),  # reversed pairs are Slicer's flipped axes
    ({"roi": [0, 1e308, 0, 1e308, 1, 1]}, (200,)),  # huge: clipped to the image
    ({"roi": [-50, -1, -50, -1, 1, 1]}, (422,)),  # negative: misses the image
    ({"roi": [8, 20, 8, 20, -5, -5]}, (422,)),
    ({"roi": "abc"}, (422,)),
    ({"roi": {"a": 1}}, (422,)),
    ({"roi": [1, 2, 3]}, (422,)),
    ({"roi": [[1, 2], [3, 4], [5, 6]]}, (422,)),
    ({"roi": True}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "slice": 10**30}, (422,)),
    ({"roi": [8, 20, 8, 20], "slice": "middle"}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "label": 12345}, (200,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "label": "x" * 100_000}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "label_prompt": [999]}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "label_prompt": "liver"}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "modality": "XYZ"}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "modality": 7}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "propagate": {"x": 1}}, (200,)),
    ({"foreground": [[10, 10, 1]] * 10_000}, (422,)),
    ({"foreground": [[1e308, 1, 1]]}, (422,)),
    ({"foreground": [[-1, -1, -1]]}, (422,)),
    ({"foreground": "here"}, (422,)),
    ({"foreground": [[1, 2, 3, 4, 5]]}, (422,)),
    ({"points": [[10, 10, 1]], "point_labels": [7]}, (422,)),
    ({"background": [[10, 10, 1]]}, (422,)),
    ({}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "result_extension": "/../../../tmp/x.nii.gz"}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "result_dtype": "complex128"}, (422,)),
    ({"roi": [8, 20, 8, 20, 1, 1], "save_label": True, "label_tag": "../../evil"}, (403,)),
]


@pytest.mark.parametrize("params, statuses", FUZZ, ids=[str(index) for index in range(len(FUZZ))])
def test_fuzzed_params_get_an_answer_never_a_500(hostile, params, statuses):
    response = post_infer(hostile, params=params)
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert detail(response)


@pytest.mark.parametrize(
    "raw_params",
    ['{"roi": [NaN, 1, 2, 3, 1, 1]}', '{"roi": [Infinity, 1, 2, 3, 1, 1]}', "not json", "[1, 2]", "null",
     "[" * 100_000 + "]" * 100_000],
    ids=["nan", "inf", "not-json", "list", "null", "deep"],
)
def test_malformed_params_text_is_a_422(hostile, raw_params):
    assert post_infer(hostile, raw_params=raw_params).status_code == 422


def test_an_unknown_model_is_a_4xx(hostile):
    response = requests.post(f"{hostile.url}/infer/no_such_model?image=tiny", data={"params": "{}"}, timeout=30)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])


def test_the_wsi_route_reads_no_server_path(hostile):
    # upstream's POST /infer/wsi/{model} reaches MONAILabelApp.infer without the queued endpoint's check
    secret = hostile.outside / "secret.nii.gz"
    response = requests.post(f"{hostile.url}/infer/wsi/{MODEL}", params={"image": str(secret)}, json={},
                             timeout=REQUEST_TIMEOUT_S)
    ANSWERS.append((f"POST /infer/wsi/{MODEL}?image={secret}", response.status_code, detail(response), 0.0))
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])


def test_the_server_is_still_up_and_serving(hostile):
    assert hostile.alive()
    assert requests.get(f"{hostile.url}/info/", timeout=30).status_code == 200
    assert post_infer(hostile).status_code == 200
    shutil.rmtree(hostile.client_dir, ignore_errors=True)
