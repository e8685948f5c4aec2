"""lib.frames.LoadedImages / file_stamp: a loaded image is reused only while its file is unchanged;
once prepared, only its header is kept (ReleasedVolume) and PreparedVolumes reads pixels only on a miss."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lib.frames import LoadedImages, PreparedVolumes, ReleasedVolume, file_stamp
from lib.modality import choose_modality, intensity_range
from medsegx.taxonomy import resolve


def test_a_rewritten_file_or_series_gets_a_new_stamp(tmp_path):
    volume = tmp_path / "ct.nii.gz"
    volume.write_bytes(b"first")
    stamp = file_stamp(str(volume))
    assert stamp == file_stamp(str(volume))
    volume.write_bytes(b"second, longer")
    assert file_stamp(str(volume)) != stamp

    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"a")
    before = file_stamp(str(series))
    (series / "2.dcm").write_bytes(b"b")  # a slice more
    assert file_stamp(str(series)) != before
    assert file_stamp(str(tmp_path / "missing")) is None


def test_the_cache_keeps_the_newest_and_ignores_unstamped(tmp_path):
    images = LoadedImages(capacity=1)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    images.put(file_stamp(str(a)), {"image": "A"})
    assert images.get(file_stamp(str(a))) == {"image": "A"}
    images.put(file_stamp(str(b)), {"image": "B"})
    assert images.get(file_stamp(str(a))) is None and images.get(file_stamp(str(b))) == {"image": "B"}
    os.utime(b, ns=(1, 1))  # touched: another stamp
    assert images.get(file_stamp(str(b))) is None
    images.put(None, {"image": "C"})
    assert images.get(None) is None


def test_released_pixels_leave_the_header_and_fail_loudly_if_read(tmp_path):
    images = LoadedImages(capacity=1)
    volume = tmp_path / "ct.nii.gz"
    volume.write_bytes(b"ct")
    stamp = file_stamp(str(volume))
    pixels = np.full((4, 5, 3), -1000, dtype=np.int16)
    pixels[0, 0, 0] = 1200
    images.put(stamp, {"image": pixels, "image_meta_dict": {"affine": np.eye(4)}})
    released = ReleasedVolume(pixels.shape, pixels.shape, None, intensity_range(pixels))
    images.release_pixels(stamp, released)

    kept = images.get(stamp)
    assert kept["image"] is released and np.array_equal(kept["image_meta_dict"]["affine"], np.eye(4))
    with pytest.raises(TypeError, match="released"):
        np.asarray(kept["image"])
    # the modality detected from the header is the one detected from the pixels
    assert choose_modality(None, None, released.intensity_range) == choose_modality(None, None, pixels)
    assert choose_modality(None, None, released.intensity_range).modality == "CT"

    images.put(("other",), {"image": "B"})  # evicts the header; releasing it again is a no-op
    images.release_pixels(stamp, released)
    assert images.get(stamp) is None


def test_prepared_volumes_read_the_pixels_only_on_a_miss():
    prepared = PreparedVolumes(capacity=1)
    volume_xyz = np.linspace(-1000, 1000, 6 * 7 * 2).reshape(6, 7, 2).astype(np.int16)
    reads = []

    def read() -> np.ndarray:
        reads.append(1)
        return volume_xyz

    liver, lung = resolve("liver", "CT"), resolve("lung", "CT")
    first, hit = prepared.get("soft", read, "CT", liver)
    assert not hit and len(reads) == 1 and "soft" in prepared
    again, hit = prepared.get("soft", read, "CT", liver)
    assert hit and again is first and len(reads) == 1
    # the same pixels as preparing from the array itself
    assert np.array_equal(first, PreparedVolumes().get("x", volume_xyz, "CT", liver)[0])
    other, hit = prepared.get("lung", read, "CT", lung)  # another window: read again, the first is evicted
    assert not hit and len(reads) == 2 and "soft" not in prepared and not np.array_equal(other, first)
