"""lib.frames.LoadedImages / file_stamp: a loaded image is reused only while its file is unchanged."""

from __future__ import annotations

import os

from lib.frames import LoadedImages, file_stamp


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
