"""Tests for medsegx.taxonomy: name resolution and embedding rows against the JSON orders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from importlib import resources
from pathlib import Path

import pytest

from medsegx import taxonomy
from medsegx.taxonomy import TaskContext, resolve, resolve_modality

SPEC_JSON = Path("/work/shared/spec/medsegdb_taxonomy.json")
PACKAGED_JSON = resources.files("medsegx.resources").joinpath("medsegdb_taxonomy.json")
# Read independently of the module so the expected rows do not share its code.
RAW = json.loads(PACKAGED_JSON.read_text())
FREE_ROW = len(RAW["tasks"])


def _row(order_key: str, name: str | None) -> int:
    return RAW[order_key].index(name) if name is not None else -1


def _expected_indices(modality, body_part, subregion, organ, task) -> tuple[int, ...]:
    return (
        RAW["modalities"].index(modality),
        _row("level1_order", body_part),
        _row("level2_order", subregion),
        _row("level3_order", organ),
        RAW["tasks"].index(task) if task is not None else FREE_ROW,
    )


def _level_members() -> set[str]:
    level_keys = ("level1_body_parts", "level2_subregions", "level3_organs")
    return {name for key in level_keys for names in RAW[key].values() for name in names}


def _parent(level_key: str, name: str) -> str | None:
    return next((parent for parent, members in RAW[level_key].items() if name in members), None)


# (target, modality, expected modality, task, organ, subregion, body part)
RESOLUTION_TABLE = [
    # MedSegDB task names
    ("Liver", "CT", "CT", "Liver", "liver", "abdomen", "body"),
    ("LeftKidney", "CT", "CT", "LeftKidney", "kidney", "abdomen", "body"),
    ("WhiteMatter", "MRI", "MRI", "WhiteMatter", "brain", "head", "head&neck"),
    ("GallBladder", "CT", "CT", "GallBladder", "gallbladder", "abdomen", "body"),
    ("ParotidL", "CT", "CT", "ParotidL", "parotid", "neck", "head&neck"),
    ("CarotidArteryRight", "US", "US", "CarotidArteryRight", "vessel", "vessel", "vessel"),
    # Modality_Target names; trailing digits stripped
    ("MRI_ProstatePeripheralZone", None, "MRI", "ProstatePeripheralZone", "prostate", "pelvis", "body"),
    ("MRI_ProstatePeripheralZone", "MR", "MRI", "ProstatePeripheralZone", "prostate", "pelvis", "body"),
    ("CT_LumbarSpine3", None, "CT", "LumbarSpine", "lumbarspine", "torso", "skeleton"),
    ("LumbarSpine3", "CT", "CT", "LumbarSpine", "lumbarspine", "torso", "skeleton"),
    ("Colon_Polyp", None, "Colonos", "Polyp", "intestine", "abdomen", "body"),
    ("US_ThyroidNodule", None, "US", "ThyroidNodule", "thyroid", "neck", "head&neck"),
    # a whole task name beats a modality-prefix reading ("Colon" is a modality alias)
    ("colon_cancer", "CT", "CT", "ColonCancer", "intestine", "abdomen", "body"),
    # free text: case, spacing, left/right word order
    ("liver", "CT", "CT", "Liver", "liver", "abdomen", "body"),
    ("Left Kidney", "CT", "CT", "LeftKidney", "kidney", "abdomen", "body"),
    ("left kidney", "CT", "CT", "LeftKidney", "kidney", "abdomen", "body"),
    ("kidney_left", "CT", "CT", "LeftKidney", "kidney", "abdomen", "body"),
    ("KidneyLeft", "CT", "CT", "LeftKidney", "kidney", "abdomen", "body"),
    ("L kidney", "CT", "CT", "LeftKidney", "kidney", "abdomen", "body"),
    ("kidney-right", "CT", "CT", "RightKidney", "kidney", "abdomen", "body"),
    ("lung left", "CT", "CT", "LeftLung", "lung", "chest", "body"),
    ("left parotid", "CT", "CT", "ParotidL", "parotid", "neck", "head&neck"),
    ("right carotid artery", "US", "US", "CarotidArteryRight", "vessel", "vessel", "vessel"),
    ("prostate peripheral zone", "MR", "MRI", "ProstatePeripheralZone", "prostate", "pelvis", "body"),
    ("aorta", "CT", "CT", "Aorta", "vessel", "vessel", "vessel"),
    ("spleen", "CT", "CT", "Spleen", "spleen", "abdomen", "body"),
    ("gallbladder", "CT", "CT", "GallBladder", "gallbladder", "abdomen", "body"),
    ("gall bladder", "CT", "CT", "GallBladder", "gallbladder", "abdomen", "body"),
    ("pancreas", "CT", "CT", "Pancreas", "pancreas", "abdomen", "body"),
    ("heart", "MR", "MRI", "Heart", "heart", "chest", "body"),
    ("white matter", "MR", "MRI", "WhiteMatter", "brain", "head", "head&neck"),
    ("grey matter", "MR", "MRI", "GrayMatter", "brain", "head", "head&neck"),
    ("gray matter", "MR", "MRI", "GrayMatter", "brain", "head", "head&neck"),
    # clinical abbreviations and synonyms
    ("ivc", "CT", "CT", "Postcava", "vessel", "vessel", "vessel"),
    ("Inferior Vena Cava", "CT", "CT", "Postcava", "vessel", "vessel", "vessel"),
    ("gm", "MR", "MRI", "GrayMatter", "brain", "head", "head&neck"),
    ("WM", "MR", "MRI", "WhiteMatter", "brain", "head", "head&neck"),
    ("csf", "MR", "MRI", "CerebroSpinalFluid", "brain", "head", "head&neck"),
    ("thyroid", "US", "US", "GlndThyroid", "thyroid", "neck", "head&neck"),
    ("LV", "MR", "MRI", "LeftVentricle", "heart", "chest", "body"),
    ("liver tumour", "CT", "CT", "LiverCancer", "liver", "abdomen", "body"),
    ("L spine", "CT", "CT", "LumbarSpine", "lumbarspine", "torso", "skeleton"),
    ("retinal vessels", "Fundus", "Fundus", "RetinalVessel", "vessel", "vessel", "vessel"),
    # not tasks: free row, ancestors from the words
    ("brain", "MR", "MRI", None, "brain", "head", "head&neck"),
    ("kidney", "CT", "CT", None, "kidney", "abdomen", "body"),
    ("lungs", "CT", "CT", None, "lung", "chest", "body"),
    ("left kidney cyst", "CT", "CT", None, "kidney", "abdomen", "body"),
    ("renal cyst", "CT", "CT", None, "kidney", "abdomen", "body"),
    ("lumbar spine fracture", "CT", "CT", None, "lumbarspine", "torso", "skeleton"),
    ("pulmonary vein", "CT", "CT", None, "vessel", "vessel", "vessel"),
    ("svc", "CT", "CT", None, "vessel", "vessel", "vessel"),
    ("cervix", "MR", "MRI", None, "uterus", "pelvis", "body"),
    ("abdominal wall hernia", "CT", "CT", None, None, "abdomen", "body"),
    ("head and neck cancer", "CT", "CT", None, None, None, "head&neck"),
    ("L3 vertebra", "CT", "CT", None, None, None, "skeleton"),
    # level members outside the task list (out-of-distribution targets)
    ("HCC", "MR", "MRI", None, "liver", "abdomen", "body"),
    ("StomachCancer", "CT", "CT", None, "stomach", "abdomen", "body"),
    ("pulmonary fibrosis", "CT", "CT", None, "lung", "chest", "body"),
    # nothing known: the root
    ("xyzzy", "CT", "CT", None, None, None, None),
    ("foreign body", "CT", "CT", None, None, None, None),
    ("", "CT", "CT", None, None, None, None),
]


@pytest.mark.parametrize(
    ("target", "modality", "exp_modality", "exp_task", "exp_organ", "exp_subregion", "exp_body_part"),
    RESOLUTION_TABLE,
)
def test_resolution_table(
    target, modality, exp_modality, exp_task, exp_organ, exp_subregion, exp_body_part
):
    context = resolve(target, modality)
    names = (context.modality, context.task, context.organ, context.subregion, context.body_part)
    assert names == (exp_modality, exp_task, exp_organ, exp_subregion, exp_body_part)
    assert context.indices == _expected_indices(
        exp_modality, exp_body_part, exp_subregion, exp_organ, exp_task
    )
    assert context.target == target.strip()


def test_packaged_json_equals_spec():
    if not SPEC_JSON.exists():
        pytest.skip(f"spec file {SPEC_JSON} not present on this machine")
    assert PACKAGED_JSON.read_bytes() == SPEC_JSON.read_bytes()


def test_version_is_short_sha_of_packaged_json():
    assert re.fullmatch(r"[0-9a-f]{12}", taxonomy.TAXONOMY_VERSION)
    assert taxonomy.TAXONOMY_VERSION == hashlib.sha256(PACKAGED_JSON.read_bytes()).hexdigest()[:12]
    assert taxonomy.load_taxonomy().version == taxonomy.TAXONOMY_VERSION


def test_load_taxonomy_is_cached_and_exposes_orders():
    tax = taxonomy.load_taxonomy()
    assert tax is taxonomy.load_taxonomy()
    assert list(tax.modalities) == RAW["modalities"]
    assert list(tax.body_parts) == RAW["level1_order"]
    assert list(tax.subregions) == RAW["level2_order"]
    assert list(tax.organs) == RAW["level3_order"]
    assert list(tax.tasks) == RAW["tasks"]
    assert tax.free_task_index == FREE_ROW
    # The paper's embedding sizes (spec/conmoae.md): 10 modalities, 5 / 12 / 39 levels, 111 tasks.
    sizes = (tax.modalities, tax.body_parts, tax.subregions, tax.organs, tax.tasks)
    assert tuple(len(names) for names in sizes) == (10, 5, 12, 39, 111)


def test_rows_follow_order_lists_not_dict_key_order():
    # level3_organs lists collarbone before thoracicspine; level3_order puts it after lumbarspine.
    assert list(RAW["level3_organs"]) != RAW["level3_order"]
    context = resolve("CollarBone", "Xray")
    assert context.organ == "collarbone"
    assert context.organ_index == RAW["level3_order"].index("collarbone")


@pytest.mark.parametrize("task", RAW["tasks"])
def test_every_task_resolves_to_itself_with_full_ancestor_chain(task):
    context = resolve(task, "CT")
    assert context.task == task
    assert context.task_index == RAW["tasks"].index(task)
    # Every task is listed under exactly one name at each level in this JSON.
    assert context.organ == _parent("level3_organs", task)
    assert context.subregion == _parent("level2_subregions", task)
    assert context.body_part == _parent("level1_body_parts", task)
    assert min(context.indices) >= 0
    tax = taxonomy.load_taxonomy()
    assert tax.organ_parent(context.organ) == context.subregion
    assert tax.subregion_parent(context.subregion) == context.body_part


@pytest.mark.parametrize("task", RAW["tasks"])
def test_every_task_resolves_with_a_modality_prefix(task):
    assert resolve(f"MRI_{task}", None).task == task


def test_level_members_outside_task_list_get_free_row_and_ancestors():
    members = _level_members()
    outside = sorted(members - set(RAW["tasks"]))
    assert "MitrLeftVentricularMyocardium" in outside  # only under level-3 "heart"
    for name in outside:
        context = resolve(name, "CT")
        assert context.task is None and context.task_index == FREE_ROW, name
        assert None not in (context.body_part, context.subregion, context.organ), name


def test_unknown_target_never_raises_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="medsegx.taxonomy"):
        context = resolve("completely unknown structure 42", "CT")
    assert context.task is None
    assert context.task_index == FREE_ROW
    assert context.indices[1:4] == (-1, -1, -1)
    assert "not a MedSegDB task" in caplog.text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CT", "CT"),
        ("ct", "CT"),
        ("MRI", "MRI"),
        ("MR", "MRI"),
        ("mr", "MRI"),
        ("xray", "Xray"),
        ("X-ray", "Xray"),
        ("US", "US"),
        ("CR", "Xray"),
        ("DX", "Xray"),
        ("RG", "Xray"),
        ("MG", "Xray"),
        ("XA", "Xray"),
        ("ES", "Endos"),
        ("OP", "Fundus"),
        ("Endoscope", "Endos"),
        ("Colonoscopy", "Colonos"),
        ("Dermoscopy", "Dermos"),
        ("Funduscopy", "Fundus"),
        ("cbct", "CBCT"),
        ("CTA", "CTA"),
    ],
)
def test_resolve_modality(name, expected):
    assert resolve_modality(name) == expected


def test_every_json_modality_and_alias_resolves():
    for name in RAW["modalities"]:
        assert resolve_modality(name) == name
    for alias, name in RAW["modality_aliases"].items():
        assert resolve_modality(alias) == name


@pytest.mark.parametrize("bad", ["PET", "NM", "", "photo"])
def test_unknown_modality_error_lists_accepted_names(bad):
    with pytest.raises(ValueError, match="unknown modality") as info:
        resolve_modality(bad)
    message = str(info.value)
    for name in (*RAW["modalities"], "MR", "DX", "OP"):
        assert name in message


def test_resolve_with_unknown_modality_raises():
    with pytest.raises(ValueError, match="unknown modality 'PET'"):
        resolve("liver", "PET")


def test_resolve_without_any_modality_raises():
    with pytest.raises(ValueError, match="no modality"):
        resolve("liver", None)


def test_explicit_modality_wins_over_prefix(caplog):
    with caplog.at_level(logging.WARNING, logger="medsegx.taxonomy"):
        context = resolve("CT_Spleen", "MR")
    assert (context.modality, context.task) == ("MRI", "Spleen")
    assert "names modality CT" in caplog.text


def test_task_context_is_frozen_and_path_is_for_display():
    context = resolve("white matter", "MR")
    assert context.path == ["MRI", "head&neck", "head", "brain", "WhiteMatter"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.task = "GrayMatter"  # type: ignore[misc]
    unknown = resolve("left kidney cyst", "CT")
    assert unknown.path == ["CT", "body", "abdomen", "kidney", "left kidney cyst"]
    assert resolve("xyzzy", "CT").path == ["CT", "xyzzy"]
    assert [f.name for f in dataclasses.fields(TaskContext)] == [
        "modality",
        "modality_index",
        "body_part",
        "body_part_index",
        "subregion",
        "subregion_index",
        "organ",
        "organ_index",
        "task",
        "task_index",
        "target",
    ]


def test_target_aliases_point_to_names_in_the_json():
    members = _level_members()
    for alias, name in taxonomy._TARGET_ALIASES.items():
        assert name in members | set(RAW["tasks"]), alias
    levels = {1: RAW["level1_order"], 2: RAW["level2_order"], 3: RAW["level3_order"]}
    for word, (level, name) in taxonomy._ANCESTOR_WORDS.items():
        assert name in levels[level], word


def test_task_names_and_label_names():
    assert list(taxonomy.task_names()) == RAW["tasks"]
    labels = taxonomy.label_names()
    assert labels["Liver"] == RAW["tasks"].index("Liver") + 1
    assert sorted(labels.values()) == list(range(1, FREE_ROW + 1))
    assert 0 not in labels.values()


def test_module_is_torch_free():
    source = Path(taxonomy.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+torch", source, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["level3_order"].pop(), "differ from its order list"),
        (lambda d: d["tasks"].append(d["tasks"][0]), "repeats a name"),
        (lambda d: d["modality_aliases"].update({"PET": "PET"}), "outside modalities"),
        (lambda d: d["level2_subregions"]["head"].append("Mandible"), "exactly one parent"),
        (lambda d: d.pop("tasks"), "lacks the key"),
    ],
)
def test_from_json_rejects_inconsistent_taxonomy(mutate, message):
    data = json.loads(PACKAGED_JSON.read_text())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        taxonomy.Taxonomy.from_json(data)
