"""MedSegDB label tree and the resolution of modality / target names to embedding rows.

MedSegX conditions every image-encoder block on a context: the modality and a path
through the MedSegDB label tree (root -> level-1 body part -> level-2 subregion ->
level-3 organ/tissue -> task). This module turns what a user, a DICOM header or a
MedSegDB folder name says ("MR", "left kidney", "MRI_ProstatePeripheralZone") into that
path and the row of each name in the checkpoint's embedding tables.

Row conventions (binding for checkpoint compatibility, see ``resources/medsegdb_taxonomy.json``):

- modality row = position in ``modalities``;
- level-1 / level-2 / level-3 rows = position in ``level1_order`` / ``level2_order`` /
  ``level3_order`` (not the key order of the level dicts: ``level3_organs`` lists
  ``collarbone`` before ``thoracicspine``, ``level3_order`` after ``lumbarspine``);
- task row = position in ``tasks``; row ``len(tasks)`` is the free row for a target that
  is not a MedSegDB task;
- an unknown level has name ``None`` and row ``-1`` (embedded as a zero vector).

The module is torch-free; ``medsegx.modeling`` turns ``TaskContext.indices`` into tensors.

Example:
    >>> ctx = resolve("white matter", "MR")
    >>> ctx.path
    ['MRI', 'head&neck', 'head', 'brain', 'WhiteMatter']
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any

__all__ = [
    "DICOM_MODALITY_TAGS",
    "TAXONOMY_VERSION",
    "TaskContext",
    "Taxonomy",
    "label_names",
    "load_taxonomy",
    "resolve",
    "resolve_modality",
    "task_names",
]

logger = logging.getLogger(__name__)

_RESOURCE_PACKAGE = "medsegx.resources"
_RESOURCE_NAME = "medsegdb_taxonomy.json"


def _read_resource_bytes() -> bytes:
    return resources.files(_RESOURCE_PACKAGE).joinpath(_RESOURCE_NAME).read_bytes()


#: First 12 hex digits of the SHA-256 of the packaged taxonomy JSON; checkpoints record it
#: so a model is never paired silently with a different embedding-row order.
TAXONOMY_VERSION: str = hashlib.sha256(_read_resource_bytes()).hexdigest()[:12]

#: DICOM (0008,0060) Modality values -> MedSegDB modality. XA (X-ray angiography), RF
#: (fluoroscopy), PX (panoramic) and IO (intra-oral) are projection X-ray images, so they
#: map to ``Xray``; ES (endoscopy, colonoscopy included) maps to ``Endos``; OP
#: (ophthalmic photography) to ``Fundus``. PET, NM, OCT ... have no MedSegDB modality.
DICOM_MODALITY_TAGS: Mapping[str, str] = MappingProxyType(
    {
        "CT": "CT",
        "MR": "MRI",
        "US": "US",
        "CR": "Xray",
        "DX": "Xray",
        "RG": "Xray",
        "MG": "Xray",
        "XA": "Xray",
        "RF": "Xray",
        "PX": "Xray",
        "IO": "Xray",
        "ES": "Endos",
        "OP": "Fundus",
    }
)

# Spelled-out modality names people type, on top of the JSON's own aliases.
_EXTRA_MODALITY_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "MR": "MRI",
        "X-ray": "Xray",
        "Ultrasound": "US",
        "Endoscopy": "Endos",
        "Cone-beam CT": "CBCT",
        "CT angiography": "CTA",
    }
)

# Clinical synonyms / abbreviations -> a name that exists in the JSON (a task or an
# out-of-distribution level member). Keys are matched with the same tokenisation as the
# JSON names, so word order of left/right and spacing do not matter.
_TARGET_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        # brain
        "gm": "GrayMatter",
        "wm": "WhiteMatter",
        "csf": "CerebroSpinalFluid",
        "wmh": "WhiteMatterHyperintensity",
        "left caudate": "LeftCaudatum",
        "right caudate": "RightCaudatum",
        "acoustic neuroma": "VestibularSchwannoma",
        "brain tumor": "BrainWholeTumor",
        "whole tumor": "BrainWholeTumor",
        "tumor core": "BrainCoreTumor",
        "enhancing tumor": "BrainEnhancingTumor",
        "ich": "IntracranialHemorrhage",
        "stroke": "IschemicStrokeLesion",
        "stroke lesion": "IschemicStrokeLesion",
        "ms": "MultipleSclerosis",
        "ms lesion": "MultipleSclerosis",
        "pituitary gland": "Pituitary",
        # head and neck
        "optic disk": "OpticDisc",
        "teeth": "Tooth",
        "oral cavity": "CavityOral",
        "npc": "GTVnx",
        "nasopharyngeal carcinoma": "GTVnx",
        "thyroid": "GlndThyroid",
        "thyroid gland": "GlndThyroid",
        "left parotid gland": "ParotidL",
        "left submandibular gland": "GindSubmandL",
        "left submandibular": "GindSubmandL",
        # chest
        "lung tumor": "LungCancer",
        "ggo": "GroundGlassesOpacities",
        "ground glass opacity": "GroundGlassesOpacities",
        "ground glass opacities": "GroundGlassesOpacities",
        "pleural effusion": "PleuraEffusion",
        "pneumothorax": "LungPneumothorax",
        "airway": "PulmonaryAirways",
        "airways": "PulmonaryAirways",
        "bronchi": "Bronchus",
        "pulmonary fibrosis": "PulmonaryLibrosis",
        "whole heart": "Heart",
        "lv": "LeftVentricle",
        "rv": "RightVentricle",
        "la": "LeftAtrium",
        "myo": "LeftVentricularMyocardium",
        "myocardium": "LeftVentricularMyocardium",
        "lv myocardium": "LeftVentricularMyocardium",
        "rv myocardium": "RightVentricularMyocardium",
        "myocardial edema": "LVMyocardialEdema",
        "myocardial scar": "LVMyocardialScars",
        "microvascular obstruction": "NoReflow",
        "mvo": "NoReflow",
        "epicardium": "LeftVentricleEpicardium",
        "breast tumor": "BreastCancer",
        # abdomen and pelvis
        "liver tumor": "LiverCancer",
        "hepatocellular carcinoma": "HCC",
        "focal nodular hyperplasia": "FNH",
        "cholangiocarcinoma": "ICC",
        "gall bladder": "GallBladder",
        "pancreatic tumor": "PancreasCancer",
        "pancreatic cancer": "PancreasCancer",
        "kidney cancer": "KidneyTumor",
        "renal tumor": "KidneyTumor",
        "left adrenal": "LeftAdrenalGland",
        "right adrenal": "RightAdrenalGland",
        "gastric cancer": "StomachCancer",
        "colon tumor": "ColonCancer",
        "colorectal cancer": "ColonCancer",
        "small intestine": "Intestine",
        "small bowel": "Intestine",
        "bowel": "Intestine",
        "surgical instrument": "Instrument",
        "urinary bladder": "Bladder",
        "central gland": "ProstateCentralGland",
        "peripheral zone": "ProstatePeripheralZone",
        "pz": "ProstatePeripheralZone",
        "transition zone": "ProstateTransitionalZone",
        "transitional zone": "ProstateTransitionalZone",
        "tz": "ProstateTransitionalZone",
        "prostate transition zone": "ProstateTransitionalZone",
        "prostate cancer": "ProstateTumor",
        # skeleton
        "jaw": "Mandible",
        "clavicle": "CollarBone",
        "left clavicle": "LeftCollarBone",
        "right clavicle": "RightCollarBone",
        "c spine": "CervicalSpine",
        "t spine": "ThoracicSpine",
        "l spine": "LumbarSpine",
        "femur": "FemurBone",
        "femoral cartilage": "FemurCartilage",
        "tibia": "TibiaBone",
        "tibial cartilage": "TibiaCartilage",
        # vessels
        "ivc": "Postcava",
        "inferior vena cava": "Postcava",
        "right carotid": "CarotidArteryRight",
        "right carotid artery": "CarotidArteryRight",
        "pulmonary embolus": "PulmonaryEmbolism",
        "true lumen": "TL",
        "false lumen": "FL",
        "false lumen thrombus": "FLT",
    }
)

# Words that only place a target in the tree (no task): name -> (level, level name).
# "cervix" in free text is the uterine cervix; MedSegDB's level-2 "cervix" is the cervical
# region of the skeleton (parent of cervicalspine), so the clinical meaning wins here.
_ANCESTOR_WORDS: Mapping[str, tuple[int, str]] = MappingProxyType(
    {
        "renal": (3, "kidney"),
        "hepatic": (3, "liver"),
        "pulmonary": (3, "lung"),
        "cardiac": (3, "heart"),
        "myocardial": (3, "heart"),
        "cerebral": (3, "brain"),
        "intracranial": (3, "brain"),
        "gastric": (3, "stomach"),
        "colonic": (3, "intestine"),
        "retina": (3, "eye"),
        "retinal": (3, "eye"),
        "ocular": (3, "eye"),
        "salivary": (3, "saliarygland"),
        "salivary gland": (3, "saliarygland"),
        "womb": (3, "uterus"),
        "cervix": (3, "uterus"),
        "vein": (3, "vessel"),
        "artery": (3, "vessel"),
        "arterial": (3, "vessel"),
        "venous": (3, "vessel"),
        "vena cava": (3, "vessel"),
        "svc": (3, "vessel"),
        "abdominal": (2, "abdomen"),
        "pelvic": (2, "pelvis"),
        "thoracic": (2, "chest"),
        "bone": (1, "skeleton"),
        "spine": (1, "skeleton"),
        "vertebra": (1, "skeleton"),
    }
)

# Level names too generic to place a target when they are only one word of it
# ("foreign body", "vertebral body"); they still match when they are the whole target.
_WHOLE_TARGET_ONLY = frozenset({"body"})

_WORD_SYNONYMS: Mapping[str, str] = MappingProxyType(
    {
        "grey": "gray",
        "tumour": "tumor",
        "tumours": "tumors",
        "oesophagus": "esophagus",
        "haemorrhage": "hemorrhage",
        "hemorrhages": "hemorrhage",
    }
)
_LEFT_WORDS = frozenset({"left", "l", "lt"})
_RIGHT_WORDS = frozenset({"right", "r", "rt"})
_STOP_WORDS = frozenset({"the", "of", "and"})
_MAX_SPAN = 4
_CAMEL_TOKEN = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_NON_ALNUM = re.compile(r"[^0-9A-Za-z]+")


@dataclass(frozen=True)
class TaskContext:
    """Where a segmentation target sits in MedSegDB, with its embedding-table rows.

    Attributes:
        modality: canonical MedSegDB modality, e.g. ``"MRI"``.
        modality_index: row in the modality embedding (position in ``modalities``).
        body_part: level-1 name (``"head&neck"``, ``"body"``, ...) or ``None`` if unknown.
        body_part_index: row in the level-1 embedding, ``-1`` if unknown.
        subregion: level-2 name (``"abdomen"``, ...) or ``None``.
        subregion_index: row in the level-2 embedding, ``-1`` if unknown.
        organ: level-3 organ/tissue name (``"kidney"``, ...) or ``None``.
        organ_index: row in the level-3 embedding, ``-1`` if unknown.
        task: MedSegDB task name or ``None`` for a target outside the task list.
        task_index: row in the task embedding; ``len(tasks)`` (the free row) if ``task``
            is ``None``.
        target: the target text as given (stripped), e.g. ``"left kidney cyst"``.
    """

    modality: str
    modality_index: int
    body_part: str | None
    body_part_index: int
    subregion: str | None
    subregion_index: int
    organ: str | None
    organ_index: int
    task: str | None
    task_index: int
    target: str

    @property
    def indices(self) -> tuple[int, int, int, int, int]:
        """Rows ``(modality, level1, level2, level3, task)``, the model's context columns."""
        return (
            self.modality_index,
            self.body_part_index,
            self.subregion_index,
            self.organ_index,
            self.task_index,
        )

    @property
    def path(self) -> list[str]:
        """Known names from modality to task for display; the raw target replaces an unknown task."""
        leaf = self.task if self.task is not None else self.target
        names = [self.modality, self.body_part, self.subregion, self.organ, leaf]
        return [name for name in names if name]


@dataclass(frozen=True)
class _Chain:
    """A resolved position in the tree: known names per level, deepest known level."""

    body_part: str | None = None
    subregion: str | None = None
    organ: str | None = None
    task: str | None = None

    @property
    def depth(self) -> int:
        if self.task is not None:
            return 4
        for depth, name in ((3, self.organ), (2, self.subregion), (1, self.body_part)):
            if name is not None:
                return depth
        return 0


@dataclass(frozen=True, eq=False)
class Taxonomy:
    """The MedSegDB label tree and the checkpoint's embedding-row orders.

    Build it with :func:`load_taxonomy` (the packaged JSON) or :meth:`from_json`.

    Attributes:
        modalities: modality names in embedding-row order.
        body_parts: level-1 names in row order (``level1_order``).
        subregions: level-2 names in row order (``level2_order``).
        organs: level-3 names in row order (``level3_order``).
        tasks: task names in row order; the free row is ``len(tasks)``.
        modality_aliases: the JSON's alias -> canonical modality map.
        body_part_members / subregion_members / organ_members: level name -> the task and
            target names listed under it in the JSON.
        version: short SHA-256 of the JSON text this was built from ("" if unknown).
    """

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    subregions: tuple[str, ...]
    organs: tuple[str, ...]
    tasks: tuple[str, ...]
    modality_aliases: Mapping[str, str]
    body_part_members: Mapping[str, tuple[str, ...]]
    subregion_members: Mapping[str, tuple[str, ...]]
    organ_members: Mapping[str, tuple[str, ...]]
    version: str = ""
    _organ_parent: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    _subregion_parent: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], version: str = "") -> Taxonomy:
        """Validate the parsed taxonomy JSON and build the tree.

        Args:
            data: the parsed ``medsegdb_taxonomy.json``.
            version: identifier recorded as :attr:`version`.

        Returns:
            The taxonomy.

        Raises:
            ValueError: if an order list and its level dict disagree, a name is repeated, a
                modality alias points outside ``modalities`` or the levels do not nest
                into a tree.
        """
        try:
            modalities = tuple(data["modalities"])
            tasks = tuple(data["tasks"])
            aliases = dict(data.get("modality_aliases", {}))
            levels = [
                (key, tuple(data[order]), {k: tuple(v) for k, v in data[key].items()})
                for key, order in (
                    ("level1_body_parts", "level1_order"),
                    ("level2_subregions", "level2_order"),
                    ("level3_organs", "level3_order"),
                )
            ]
        except KeyError as error:
            raise ValueError(f"taxonomy JSON lacks the key {error}") from None
        for label, names in (("modalities", modalities), ("tasks", tasks)):
            if len(set(names)) != len(names):
                raise ValueError(f"taxonomy {label} repeats a name: {names}")
        bad_aliases = {a: m for a, m in aliases.items() if m not in modalities}
        if bad_aliases:
            raise ValueError(f"taxonomy modality_aliases point outside modalities: {bad_aliases}")
        for key, order, members in levels:
            if len(set(order)) != len(order) or set(order) != set(members):
                raise ValueError(
                    f"taxonomy {key} keys {sorted(members)} differ from its order list {list(order)}"
                )
        (_, body_parts, body_members), (_, subregions, sub_members), (_, organs, organ_members) = levels
        organ_parent = _parents_by_overlap(organ_members, sub_members, "level3 organ")
        subregion_parent = _parents_by_overlap(sub_members, body_members, "level2 subregion")
        return cls(
            modalities=modalities,
            body_parts=body_parts,
            subregions=subregions,
            organs=organs,
            tasks=tasks,
            modality_aliases=MappingProxyType(aliases),
            body_part_members=MappingProxyType(body_members),
            subregion_members=MappingProxyType(sub_members),
            organ_members=MappingProxyType(organ_members),
            version=version,
            _organ_parent=MappingProxyType(organ_parent),
            _subregion_parent=MappingProxyType(subregion_parent),
        )

    @property
    def free_task_index(self) -> int:
        """Task row used for a target outside the task list (``len(tasks)``)."""
        return len(self.tasks)

    @functools.cached_property
    def level_members(self) -> frozenset[str]:
        """Every task or target name listed under some level (tasks and OOD targets)."""
        return frozenset(
            name
            for members in (self.body_part_members, self.subregion_members, self.organ_members)
            for names in members.values()
            for name in names
        )

    def organ_parent(self, organ: str) -> str | None:
        """Level-2 subregion containing a level-3 organ (``"kidney"`` -> ``"abdomen"``)."""
        return self._organ_parent.get(organ)

    def subregion_parent(self, subregion: str) -> str | None:
        """Level-1 body part containing a level-2 subregion (``"abdomen"`` -> ``"body"``)."""
        return self._subregion_parent.get(subregion)

    def ancestors(self, name: str) -> tuple[str | None, str | None, str | None]:
        """Level-1, level-2 and level-3 parents of a task or target name.

        A level a name is not listed under is filled in from the parent of the level
        below it (``MitrLeftVentricularMyocardium`` appears only under level-3 ``heart``).

        Args:
            name: a task or level-member name, spelled as in the JSON.

        Returns:
            ``(body_part, subregion, organ)``; ``None`` where unknown.
        """
        organ = _find_parent(self.organ_members, name)
        subregion = _find_parent(self.subregion_members, name)
        if subregion is None and organ is not None:
            subregion = self.organ_parent(organ)
        body_part = _find_parent(self.body_part_members, name)
        if body_part is None and subregion is not None:
            body_part = self.subregion_parent(subregion)
        return body_part, subregion, organ


def _find_parent(members: Mapping[str, tuple[str, ...]], name: str) -> str | None:
    return next((parent for parent, names in members.items() if name in names), None)


def _parents_by_overlap(
    children: Mapping[str, tuple[str, ...]],
    parents: Mapping[str, tuple[str, ...]],
    label: str,
) -> dict[str, str]:
    """Parent of each child level name: the parent whose members contain the child's."""
    result: dict[str, str] = {}
    for child, names in children.items():
        found = {parent for parent, members in parents.items() if set(names) & set(members)}
        if len(found) != 1:
            raise ValueError(
                f"taxonomy {label} {child!r} should sit under exactly one parent, found {sorted(found)}"
            )
        result[child] = found.pop()
    return result


@functools.cache
def load_taxonomy() -> Taxonomy:
    """Load the packaged MedSegDB taxonomy (cached).

    Returns:
        The :class:`Taxonomy` of ``medsegx/resources/medsegdb_taxonomy.json``, with
        ``version == TAXONOMY_VERSION``.
    """
    raw = _read_resource_bytes()
    version = hashlib.sha256(raw).hexdigest()[:12]
    return Taxonomy.from_json(json.loads(raw), version=version)


# ----------------------------------------------------------------------------- modality


def _modality_key(name: str) -> str:
    return _NON_ALNUM.sub("", name).lower()


@functools.cache
def _modality_table() -> tuple[Mapping[str, str], tuple[str, ...]]:
    """Normalised alias -> canonical modality, and the accepted spellings for messages."""
    taxonomy = load_taxonomy()
    spellings: dict[str, str] = {name: name for name in taxonomy.modalities}
    spellings.update(taxonomy.modality_aliases)
    spellings.update(_EXTRA_MODALITY_ALIASES)
    spellings.update(DICOM_MODALITY_TAGS)
    table: dict[str, str] = {}
    for spelling, canonical in spellings.items():
        key = _modality_key(spelling)
        if table.setdefault(key, canonical) != canonical:
            raise ValueError(f"modality alias {spelling!r} is ambiguous: {table[key]} or {canonical}")
    # One spelling per normalised key for the error message ("Xray", not also "xray").
    shown = {_modality_key(spelling): spelling for spelling in reversed(list(spellings))}
    return MappingProxyType(table), tuple(sorted(shown.values(), key=str.lower))


def resolve_modality(name: str) -> str:
    """Canonical MedSegDB modality for a name, alias or DICOM Modality tag.

    Matching ignores case, spaces, hyphens and underscores ("x-ray", "MR", "mri").

    Args:
        name: e.g. ``"MRI"``, ``"MR"`` (DICOM), ``"xray"``, ``"DX"``, ``"Endoscope"``.

    Returns:
        One of ``load_taxonomy().modalities``, e.g. ``"MRI"``.

    Raises:
        ValueError: if the name is not recognised; the message lists the accepted names.
    """
    table, accepted = _modality_table()
    canonical = table.get(_modality_key(str(name)))
    if canonical is None:
        raise ValueError(
            f"unknown modality {name!r}; accepted (case-insensitive): {', '.join(accepted)}"
        )
    return canonical


# ------------------------------------------------------------------------------- target


def _tokens(text: str) -> list[str]:
    """Lower-case words of a name: splits on non-alphanumerics and camelCase."""
    words = [w.lower() for chunk in _NON_ALNUM.split(text) for w in _CAMEL_TOKEN.findall(chunk)]
    return [_WORD_SYNONYMS.get(w, w) for w in words if w not in _STOP_WORDS]


def _split_side(words: list[str]) -> tuple[str, list[str]]:
    """Pull one left/right word out so "KidneyLeft", "left kidney" and "L kidney" agree."""
    sides = {"left" for w in words if w in _LEFT_WORDS} | {"right" for w in words if w in _RIGHT_WORDS}
    rest = [w for w in words if w not in _LEFT_WORDS and w not in _RIGHT_WORDS]
    if len(sides) != 1 or not rest:
        return "", words
    return sides.pop(), rest


def _target_key(words: list[str]) -> str:
    side, rest = _split_side(words)
    return f"{side}:{''.join(rest)}"


def _level_key(name: str) -> str:
    return "".join(_tokens(name))


@functools.cache
def _target_tables() -> tuple[Mapping[str, str], Mapping[str, _Chain]]:
    """Exact-name table (key -> JSON name) and ancestor-word table (key -> chain)."""
    taxonomy = load_taxonomy()
    names: dict[str, str] = {}
    for name in (*taxonomy.tasks, *sorted(taxonomy.level_members - set(taxonomy.tasks))):
        key = _target_key(_tokens(name))
        if names.setdefault(key, name) != name:
            raise ValueError(f"taxonomy names {names[key]!r} and {name!r} normalise alike")
    for alias, name in _TARGET_ALIASES.items():
        if name not in taxonomy.level_members and name not in taxonomy.tasks:
            raise ValueError(f"target alias {alias!r} points to {name!r}, not in the taxonomy")
        key = _target_key(_tokens(alias))
        if names.setdefault(key, name) != name:
            raise ValueError(f"target alias {alias!r} collides with the taxonomy name {names[key]!r}")

    words: dict[str, _Chain] = {}
    # Level names first, then the side-less form of every known name ("lung" from
    # "LeftLung"), then extra clinical words; a deeper level wins a shared key ("vessel").
    for level, order in ((1, taxonomy.body_parts), (2, taxonomy.subregions), (3, taxonomy.organs)):
        for level_name in order:
            _add_word(words, _level_key(level_name), _level_chain(taxonomy, level, level_name))
    for key, name in names.items():
        _add_word(words, key.partition(":")[2], _name_chain(taxonomy, name, keep_task=False))
    for word, (level, level_name) in _ANCESTOR_WORDS.items():
        words[_level_key(word)] = _level_chain(taxonomy, level, level_name)
    return MappingProxyType(names), MappingProxyType(words)


def _add_word(words: dict[str, _Chain], key: str, chain: _Chain) -> None:
    if key and (key not in words or chain.depth > words[key].depth):
        words[key] = chain


def _level_chain(taxonomy: Taxonomy, level: int, name: str) -> _Chain:
    if level == 3:
        subregion = taxonomy.organ_parent(name)
        return _Chain(taxonomy.subregion_parent(subregion or ""), subregion, name)
    if level == 2:
        return _Chain(taxonomy.subregion_parent(name), name)
    return _Chain(name)


def _name_chain(taxonomy: Taxonomy, name: str, keep_task: bool = True) -> _Chain:
    body_part, subregion, organ = taxonomy.ancestors(name)
    task = name if keep_task and name in taxonomy.tasks else None
    return _Chain(body_part, subregion, organ, task)


def _strip_trailing_digits(words: list[str]) -> list[str]:
    # MedSegDB numbers repeated targets ("LumbarSpine3"); a bare number alone stays.
    while len(words) > 1 and words[-1].isdigit():
        words = words[:-1]
    return words


def _exact_chain(words: list[str]) -> _Chain | None:
    """Chain of a target that is, as a whole, a JSON name or alias (plural tolerated)."""
    taxonomy = load_taxonomy()
    names, level_words = _target_tables()
    key = _target_key(words)
    candidates = [key] + ([key[:-1]] if key.endswith("s") and len(key) > 4 else [])
    for candidate in candidates:
        if candidate in names:
            return _name_chain(taxonomy, names[candidate])
    for candidate in candidates:
        side, _, rest = candidate.partition(":")
        if not side and rest in level_words:
            return level_words[rest]
    return None


def _inferred_chain(words: list[str]) -> _Chain:
    """Best ancestor from the words of an unknown target, or the root.

    Every run of up to four words is looked up (so "lumbar spine" beats "spine"); a match
    inside a longer match is dropped, then the deepest level wins, then the right-most
    match (the head noun in English: "pulmonary vein" -> vessel).
    """
    _, level_words = _target_tables()
    rest = [w for w in words if w not in _LEFT_WORDS and w not in _RIGHT_WORDS and not w.isdigit()]
    matches: list[tuple[int, int, _Chain]] = []
    for start in range(len(rest)):
        for stop in range(start + 1, min(start + _MAX_SPAN, len(rest)) + 1):
            key = "".join(rest[start:stop])
            chain = level_words.get(key)
            if chain is None and len(key) > 4 and key.endswith("s"):
                chain = level_words.get(key[:-1])
            if chain is None or (key in _WHOLE_TARGET_ONLY and stop - start < len(rest)):
                continue
            matches.append((start, stop, chain))
    maximal = [
        (start, stop, chain)
        for start, stop, chain in matches
        if not any(s <= start and stop <= e and (s, e) != (start, stop) for s, e, _ in matches)
    ]
    if not maximal:
        return _Chain()
    _, _, best = max(maximal, key=lambda match: (match[2].depth, match[0]))
    return best


def _split_modality_prefix(target: str) -> tuple[str | None, str]:
    """``"MRI_ProstatePeripheralZone"`` -> ``("MRI", "ProstatePeripheralZone")``."""
    prefix, sep, remainder = target.partition("_")
    if not sep or not remainder.strip(" _"):
        return None, target
    try:
        return resolve_modality(prefix), remainder
    except ValueError:
        return None, target


@functools.lru_cache(maxsize=4096)
def _resolve_cached(target: str, modality: str | None) -> TaskContext:
    taxonomy = load_taxonomy()
    words = _strip_trailing_digits(_tokens(target))
    whole_chain = _exact_chain(words) if words else None
    prefix_modality, remainder = _split_modality_prefix(target)
    # A whole-name match wins over a prefix split ("Colon_Cancer" is a task and "Colon" a
    # modality alias) unless no modality was passed, so the prefix must supply it.
    if prefix_modality is not None and (whole_chain is None or modality is None):
        remainder_words = _strip_trailing_digits(_tokens(remainder))
        chain = _exact_chain(remainder_words) or _inferred_chain(remainder_words)
        if chain.depth == 0:
            chain = whole_chain or _inferred_chain(words)
    else:
        prefix_modality = None
        chain = whole_chain or _inferred_chain(words)

    explicit = resolve_modality(modality) if modality is not None else None
    if explicit is None and prefix_modality is None:
        raise ValueError(
            f"no modality for target {target!r}: pass modality= or use a 'Modality_Target' name"
        )
    if explicit is not None and prefix_modality is not None and explicit != prefix_modality:
        logger.warning(
            "target %r names modality %s but modality=%r was given; using %s",
            target,
            prefix_modality,
            modality,
            explicit,
        )
    canonical_modality = explicit or prefix_modality
    if chain.task is None:
        logger.info(
            "target %r is not a MedSegDB task; using the free task row under %s",
            target,
            " / ".join(n for n in (chain.body_part, chain.subregion, chain.organ) if n) or "the root",
        )
    return TaskContext(
        modality=canonical_modality,
        modality_index=taxonomy.modalities.index(canonical_modality),
        body_part=chain.body_part,
        body_part_index=_row(taxonomy.body_parts, chain.body_part),
        subregion=chain.subregion,
        subregion_index=_row(taxonomy.subregions, chain.subregion),
        organ=chain.organ,
        organ_index=_row(taxonomy.organs, chain.organ),
        task=chain.task,
        task_index=_row(taxonomy.tasks, chain.task, missing=taxonomy.free_task_index),
        target=target,
    )


def _row(order: tuple[str, ...], name: str | None, missing: int = -1) -> int:
    return order.index(name) if name is not None else missing


def resolve(target: str, modality: str | None) -> TaskContext:
    """Place a segmentation target in the MedSegDB tree and find its embedding rows.

    The target may be a MedSegDB task (``"LeftKidney"``), a ``Modality_Target`` name
    (``"MRI_ProstatePeripheralZone"``, trailing digits stripped: ``"CT_LumbarSpine3"``)
    or free text (``"kidney_left"``, ``"L kidney"``, ``"grey matter"``, ``"ivc"``).
    Matching ignores case, spaces, underscores, hyphens and where "left"/"right" stands.
    A target outside the task list gets the free task row and the deepest ancestor its
    words reveal ("renal cyst" -> organ ``kidney``), else the root (all levels unknown).

    Args:
        target: what to segment.
        modality: MedSegDB modality, alias or DICOM tag; ``None`` to take it from a
            ``Modality_Target`` name. When both are given and differ, this one wins.

    Returns:
        The :class:`TaskContext`.

    Raises:
        ValueError: if the modality is unknown or none is given; never for the target.
    """
    return _resolve_cached(str(target).strip(), modality)


def task_names() -> tuple[str, ...]:
    """MedSegDB task names in task-embedding row order."""
    return load_taxonomy().tasks


def label_names() -> dict[str, int]:
    """Label map for an app: task name -> label value ``task row + 1`` (0 is background)."""
    return {name: row + 1 for row, name in enumerate(load_taxonomy().tasks)}
