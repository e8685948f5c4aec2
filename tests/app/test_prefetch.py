"""Idle-time prefetch (``lib/prefetch.py``): after a request, the neighbouring slices are encoded.

Its own server with ``--conf prefetch_slices 6`` (the shared one runs with prefetch off, so
other tests can say which boxes miss the cache). Through the stock Slicer client: a box on a
slice, then, once ``/info`` says the prefetch is done, a box on the next slice and a 3D box on
the adjacent range are cache hits with the same mask as a server that encodes them afresh; a
request that arrives while the prefetch runs is served and the prefetch yields to it.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from lib.prefetch import neighbour_slices
from medsegx.metrics import dice

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "medsegx"
LIVER = 1
PREFETCH = 6
DEADLINE_S = 300


@pytest.fixture(scope="module")
def prefetching_server(sample_data, server_launcher, tmp_path_factory):
    generator = server_launcher.serve(tmp_path_factory.mktemp("prefetch-server"), sample_data["datastore"],
                                      "--conf", "prefetch_slices", str(PREFETCH))
    yield next(generator)
    generator.close()


@pytest.fixture(scope="module")
def liver(sample_data):
    return np.asarray(nib.load(sample_data["labels"]["ct_phantom"]).dataobj) == LIVER


def liver_roi(liver: np.ndarray, z_first: int, z_last: int) -> list[int]:
    x, y, _ = np.nonzero(liver)
    return [int(x.min()), int(x.max()), int(y.min()), int(y.max()), z_first, z_last]


def prefetch_status(client) -> dict:
    return client.info()["medsegx"]["prefetch"]


def wait_prefetched(client, encoded: int) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        status = prefetch_status(client)
        if status["encoded"] >= encoded and not status["running"] and not status["pending"]:
            return status
        time.sleep(0.5)
    raise AssertionError(f"the prefetch did not encode {encoded} slices in {DEADLINE_S} s: {status}")


def test_neighbour_slices_alternate_nearest_first():
    assert neighbour_slices(10, 12, 40, 5) == [13, 9, 14, 8, 15]
    assert neighbour_slices(0, 1, 5, 10) == [2, 3, 4]  # clipped to the volume
    assert neighbour_slices(3, 3, 4, 0) == []


def test_neighbours_of_a_box_are_cache_hits(prefetching_server, server, liver):
    client = prefetching_server.client()
    z_values = np.flatnonzero(liver.any(axis=(0, 1)))
    z = int(z_values[len(z_values) // 2])
    assert prefetch_status(client)["encoded"] == 0

    _, first = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, z, z)})
    assert first["latencies"]["cache_hit"] is False
    wait_prefetched(client, PREFETCH)

    # a box on the next slice: no encoder pass, the same mask as a server without prefetch
    file_next, nxt = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, z + 1, z + 1)})
    assert nxt["latencies"]["cache_hit"] is True and nxt["latencies"]["model"]["encode"] == 0.0
    reference_file, _ = server.client().infer(MODEL, "ct_phantom",
                                                      {"label": "liver", "roi": liver_roi(liver, z + 1, z + 1)})
    ours, theirs = (np.asarray(nib.load(f).dataobj)[..., z + 1] > 0 for f in (file_next, reference_file))
    assert dice(ours, theirs) >= 0.99 and dice(ours, liver[..., z + 1]) >= 0.85

    # a 3D box on the adjacent range: every slice was prefetched (z-3 .. z+3, minus z itself)
    _, three_d = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, z - 3, z - 1)})
    assert three_d["latencies"]["model"]["slices"] == 3 and three_d["latencies"]["cache_hit"] is True, three_d


def test_a_request_during_the_prefetch_is_served_and_the_prefetch_yields(prefetching_server, liver):
    client = prefetching_server.client()
    z_values = np.flatnonzero(liver.any(axis=(0, 1)))
    z = int(z_values[len(z_values) // 4])  # far from the slices the test above prefetched
    before = prefetch_status(client)["encoded"]
    client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, z, z)})
    # at once, while the neighbours of z are being encoded: a box elsewhere
    far = int(z_values[-1])
    _, result = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, far, far)})
    assert result["voxels"] > 0
    status = wait_prefetched(client, before + PREFETCH)
    # the second request's neighbourhood replaced the first one's: what was left of the first (six
    # encoder passes, seconds) was dropped when the second request came, a few milliseconds later
    assert status["encoded"] < before + 2 * PREFETCH, status
    _, near_far = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, far - 1, far - 1)})
    assert near_far["latencies"]["cache_hit"] is True


def test_a_second_request_does_not_read_the_image_again(prefetching_server, liver):
    client = prefetching_server.client()
    z = int(np.flatnonzero(liver.any(axis=(0, 1)))[1])
    client.infer(MODEL, "ct_phantom_unlabelled", {"label": "liver", "roi": liver_roi(liver, z, z)})  # evicts ct_phantom
    file_a, first = client.infer(MODEL, "ct_phantom",
                                 {"label": "liver", "roi": liver_roi(liver, z, z)})
    file_b, second = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": liver_roi(liver, z, z)})
    # the same file as the request before: MONAI's LoadImaged did not run (lib.frames.LoadedImages)
    pre_transforms = (second["latencies"].get("transform") or {}).get("pre") or {}
    assert "LoadImaged" not in pre_transforms and first["latencies"]["transform"]["pre"]["LoadImaged"] > 0, second
    masks = [np.asarray(nib.load(f).dataobj) for f in (file_a, file_b)]
    assert np.array_equal(*masks) and masks[0].any()
    assert np.allclose(nib.load(file_a).affine, nib.load(file_b).affine)


def test_a_prepared_volume_serves_without_its_pixels_and_another_window_reads_the_file(prefetching_server, liver):
    """Once prepared, the server keeps only the volume's header (lib.frames.ReleasedVolume): the next
    request on it does not read the file; a label in another CT window does (``image_read_again``),
    and a window whose prepared volume was evicted gives the same mask as when the pixels were loaded."""
    client = prefetching_server.client()
    z = int(np.flatnonzero(liver.any(axis=(0, 1)))[2])
    roi = liver_roi(liver, z, z)
    client.infer(MODEL, "ct_phantom_unlabelled", {"label": "liver", "roi": roi})  # evicts ct_phantom's image

    def infer(label: str) -> tuple[np.ndarray, dict]:
        file, result = client.infer(MODEL, "ct_phantom", {"label": label, "roi": roi})
        read = "LoadImaged" in ((result["latencies"].get("transform") or {}).get("pre") or {})
        return np.asarray(nib.load(file).dataobj), {**result["latencies"]["model"], "loaded": read}

    liver_loaded, loaded = infer("liver")  # reads the file, prepares the soft-tissue window, lets the pixels go
    assert loaded["loaded"] and not loaded["image_read_again"] and liver_loaded.any()
    _, lung = infer("lung")  # lung window: not prepared yet
    assert not lung["loaded"] and lung["image_read_again"] and not lung["prepared_volume_cached"]
    _, lung_again = infer("lung")
    assert not lung_again["loaded"] and not lung_again["image_read_again"] and lung_again["prepared_volume_cached"]
    _, bone = infer("femur")  # bone window: read again; the soft-tissue volume leaves the 2-volume cache
    assert bone["image_read_again"]
    liver_reread, again = infer("liver")
    assert again["image_read_again"] and not again["loaded"]
    if again["runtime"] == loaded["runtime"]:
        assert np.array_equal(liver_reread, liver_loaded)
    else:  # the OpenVINO graphs became ready in between
        assert dice(liver_reread[..., z] > 0, liver_loaded[..., z] > 0) >= 0.99
