"""Label names of a saved label: MONAI Label's label info and ``<image id>_labels.json`` sidecars."""

from __future__ import annotations

import json

import pytest
from lib.labelled_slices import parse_label_names, read_label_sidecar


@pytest.mark.parametrize("value", [
    {"liver": 1, "spleen": 2},
    {"1": "liver", "2": "spleen"},
    [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}],
    {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "value": 2}]},
    {"label_names": {"liver": 1, "spleen": 2}, "ts": 123},
    {"liver": 1, "spleen": 2, "background": 0, "modality": "CT"},
])
def test_parse_label_names_spellings(value):
    assert parse_label_names(value) == {1: "liver", 2: "spleen"}


def test_parse_label_names_ignores_junk():
    assert parse_label_names({"ts": 17, "name": "x.nii.gz"}) == {17: "ts"}  # a plain name->value map
    assert parse_label_names([{"name": "liver"}, {"idx": 2}, "liver"]) == {}
    assert parse_label_names(None) == {}


def test_read_label_sidecar_first_existing(tmp_path):
    broken = tmp_path / "a_labels.json"
    broken.write_text("{not json")
    good = tmp_path / "b_labels.json"
    good.write_text(json.dumps({"liver": 1, "modality": "CT"}))
    names, modality, path = read_label_sidecar([tmp_path / "missing.json", broken, good])
    assert (names, modality, path) == ({1: "liver"}, "CT", good)
    assert read_label_sidecar([tmp_path / "missing.json"]) == ({}, None, None)
