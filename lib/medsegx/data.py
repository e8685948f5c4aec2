"""MedSegDB readers: folder scanners, a torch ``Dataset`` and a synthetic-data writer.

On-disk layouts (the public MedSegDB release)::

    ID / train:  <root>/<dataset>/<Modality>_<Target>[/<sequence>]/npy_imgs|npy_gts/<case>.npy
    OOD:         <root>/<shift>/<Modality>_<Target>/<dataset>[/<sequence>]/
                     finetune/<NNN>_percent/npy_imgs|npy_gts
                     inference/npy_imgs|npy_gts
                 shift in cross_site | cross_task, NNN in 5 | 15 | 25 | 50 | 100
                 (read as an integer, so "005_percent" and "5_percent" both match)

Images are ``H x W x 3`` uint8, ground truths ``H x W`` uint8 {0, 1}, with the same file
name in both folders. The ``<Modality>_<Target>`` folder name is split at its first
underscore and resolved to the ConMoAE context with ``medsegx.taxonomy.resolve``.

Every item is the one model item of ``medsegx.items`` (the predictor's own transform:
longest side resized to 256, normalised, zero-padded bottom/right), plus the file::

    {"image": float32 (3, 256, 256), "label": float32 (1, 256, 256) {0, 1},
     "box": float32 (4,) XYXY in the 256 frame, "valid_hw": int64 (2,), "scale": float32 (),
     "context": int64 (5,), "path": str}

so that a MedSegDB case, a datastore slice in the app's train task and a request to the
predictor give the model bit-identical inputs for the same pixels.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medsegx import taxonomy
from medsegx.items import TRAIN_BOX_JITTER, PixelNormalize, item_from_arrays, jitter_box
from medsegx.transforms import IMAGE_SIZE

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIZE",
    "TRAIN_BOX_JITTER",
    "OOD_SHIFTS",
    "OOD_PERCENTS",
    "MedSegRecord",
    "split_task_folder",
    "scan_id_layout",
    "scan_ood_layout",
    "MedSegDBDataset",
    "MedSegDBIDDataset",
    "MedSegDBOODDataset",
    "write_synthetic_medsegdb",
]

OOD_SHIFTS = ("cross_site", "cross_task")
OOD_PERCENTS = (5, 15, 25, 50, 100)
OOD_SPLITS = ("finetune", "inference")

IMAGES_FOLDER = "npy_imgs"
MASKS_FOLDER = "npy_gts"
_PERCENT_FOLDER = re.compile(r"^(\d+)_percent$")


@dataclass(frozen=True)
class MedSegRecord:
    """One image / ground-truth pair of MedSegDB.

    Attributes:
        image_path: the ``npy_imgs/<case>.npy`` file (``H x W x 3`` uint8).
        gt_path: the matching ``npy_gts/<case>.npy`` file (``H x W`` uint8 {0, 1}).
        dataset: source dataset folder name, e.g. ``"BraTS2020"``.
        modality: modality as written in the task folder, e.g. ``"MRI"``.
        target: target as written in the task folder, e.g. ``"ProstatePeripheralZone"``.
        sequence: sequence sub-folder (``"T2"``, ``"FLAIR"``...) or ``None``.
        context: ``taxonomy.resolve(target, modality).indices``, the 5 ConMoAE indices
            (modality, level1, level2, level3, task).
        shift: ``"cross_site"`` / ``"cross_task"`` for OOD records, ``None`` for ID ones.
    """

    image_path: Path
    gt_path: Path
    dataset: str
    modality: str
    target: str
    sequence: str | None
    context: tuple[int, int, int, int, int]
    shift: str | None = None

    @property
    def task_folder(self) -> str:
        """The ``<Modality>_<Target>`` folder name."""
        return f"{self.modality}_{self.target}"


def split_task_folder(name: str) -> tuple[str, str]:
    """Splits a ``<Modality>_<Target>`` folder name at its first underscore.

    Args:
        name: e.g. ``"MRI_ProstatePeripheralZone"``.

    Returns:
        ``(modality, target)``, e.g. ``("MRI", "ProstatePeripheralZone")``.

    Raises:
        ValueError: if ``name`` has no underscore or an empty part.
    """
    modality, separator, target = name.partition("_")
    if not separator or not modality or not target:
        raise ValueError(f"task folder {name!r} is not of the form <Modality>_<Target>")
    return modality, target


@functools.lru_cache(maxsize=None)
def _context_indices(modality: str, target: str) -> tuple[int, int, int, int, int]:
    return tuple(int(index) for index in taxonomy.resolve(target, modality).indices)


def _task_context(task_dir: Path) -> tuple[str, str, tuple[int, int, int, int, int]]:
    """Modality, target and context indices of a ``<Modality>_<Target>`` folder."""
    modality, target = split_task_folder(task_dir.name)
    try:
        context = _context_indices(modality, target)
    except ValueError as error:
        raise ValueError(f"cannot resolve the task folder {task_dir}: {error}") from error
    return modality, target, context


def _subdirs(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _is_case_dir(folder: Path) -> bool:
    return (folder / IMAGES_FOLDER).is_dir() or (folder / MASKS_FOLDER).is_dir()


def _paired_files(case_dir: Path) -> list[tuple[Path, Path]]:
    """Pairs ``npy_imgs/*.npy`` with ``npy_gts/*.npy`` by file name.

    Raises:
        ValueError: if one of the two folders is missing or a file has no partner.
    """
    images_dir, masks_dir = case_dir / IMAGES_FOLDER, case_dir / MASKS_FOLDER
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise ValueError(
                f"{case_dir} has no {folder.name}/ folder (expected both {IMAGES_FOLDER}/ and {MASKS_FOLDER}/)"
            )
    image_names = {path.name for path in images_dir.glob("*.npy")}
    mask_names = {path.name for path in masks_dir.glob("*.npy")}
    images_without_mask = sorted(image_names - mask_names)
    if images_without_mask:
        raise ValueError(
            f"image {images_without_mask[0]} in {images_dir} has no ground truth of the same name in {masks_dir} "
            f"({len(images_without_mask)} unpaired image(s))"
        )
    masks_without_image = sorted(mask_names - image_names)
    if masks_without_image:
        raise ValueError(
            f"ground truth {masks_without_image[0]} in {masks_dir} has no image of the same name in {images_dir} "
            f"({len(masks_without_image)} unpaired ground truth(s))"
        )
    return [(images_dir / name, masks_dir / name) for name in sorted(image_names)]


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"MedSegDB root {root} is not a directory")
    return root


def scan_id_layout(root: str | os.PathLike, datasets: Sequence[str] | None = None) -> list[MedSegRecord]:
    """Lists the cases of an ID / train tree.

    Layout: ``<root>/<dataset>/<Modality>_<Target>[/<sequence>]/npy_imgs|npy_gts/<case>.npy``.
    Folders are visited in sorted order, so the result is deterministic.

    Args:
        root: the ID root folder.
        datasets: only these dataset folders (default: all).

    Returns:
        One ``MedSegRecord`` per image (``shift=None``), empty masks included.

    Raises:
        ValueError: if ``root`` is not a directory, holds no case, a requested dataset is
            missing, a task folder is not ``<Modality>_<Target>`` or a file is unpaired.
    """
    root = _check_root(root)
    dataset_dirs = _subdirs(root)
    if datasets is not None:
        available = {path.name for path in dataset_dirs}
        missing = sorted(set(datasets) - available)
        if missing:
            raise ValueError(f"datasets {missing} not found under {root}; available: {sorted(available)}")
        dataset_dirs = [path for path in dataset_dirs if path.name in set(datasets)]
    records: list[MedSegRecord] = []
    for dataset_dir in dataset_dirs:
        for task_dir in _subdirs(dataset_dir):
            if "_" not in task_dir.name:
                logger.warning("skipping %s: not a <Modality>_<Target> folder", task_dir)
                continue
            modality, target, context = _task_context(task_dir)
            if _is_case_dir(task_dir):
                case_dirs = [(None, task_dir)]
            else:
                case_dirs = [(sequence_dir.name, sequence_dir) for sequence_dir in _subdirs(task_dir)
                             if _is_case_dir(sequence_dir)]
            for sequence, case_dir in case_dirs:
                records.extend(
                    MedSegRecord(image_path, gt_path, dataset_dir.name, modality, target, sequence, context)
                    for image_path, gt_path in _paired_files(case_dir)
                )
    if not records:
        raise ValueError(
            f"no MedSegDB ID cases under {root}: expected "
            f"<root>/<dataset>/<Modality>_<Target>[/<sequence>]/{IMAGES_FOLDER}|{MASKS_FOLDER}/<case>.npy"
        )
    return records


def _split_dir(base: Path, split: str, percent: int) -> Path:
    """The folder holding npy_imgs/npy_gts for one OOD task/dataset[/sequence] and split."""
    split_dir = base / split
    if split == "inference":
        return split_dir
    by_percent = {}
    for folder in _subdirs(split_dir):
        match = _PERCENT_FOLDER.match(folder.name)
        if match:
            by_percent[int(match.group(1))] = folder
    if percent in by_percent:
        return by_percent[percent]
    if percent == 100 and not by_percent and _is_case_dir(split_dir):
        # Trees without percent sub-folders keep the whole fine-tune split in finetune/.
        return split_dir
    raise ValueError(f"no {percent}_percent folder in {split_dir}; available percents: {sorted(by_percent)}")


def scan_ood_layout(
    root: str | os.PathLike,
    split: str = "finetune",
    percent: int | str = 100,
    shift: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
) -> list[MedSegRecord]:
    """Lists the cases of an OOD / real-world tree.

    Layout: ``<root>/<shift>/<Modality>_<Target>/<dataset>[/<sequence>]/finetune/<NNN>_percent/``
    and ``.../inference/``, each holding ``npy_imgs/`` and ``npy_gts/``.

    Args:
        root: the OOD root folder (holding ``cross_site/`` and/or ``cross_task/``).
        split: ``"finetune"`` or ``"inference"``.
        percent: fine-tune fraction, 5 / 15 / 25 / 50 / 100 in the release (any integer
            1..100 matching a ``<NNN>_percent`` folder); ignored for ``"inference"``.
            ``percent="inference"`` is accepted as a shorthand for ``split="inference"``.
        shift: only ``"cross_site"`` or ``"cross_task"`` (default: both, where present).
        task: only this ``<Modality>_<Target>`` folder, e.g. ``"CT_Liver"``.
        dataset: only this dataset folder.

    Returns:
        One ``MedSegRecord`` per image, with ``shift`` set, empty masks included.

    Raises:
        ValueError: for an unknown split, percent or shift, a missing percent folder, an
            unpaired file, or when nothing matches.
    """
    root = _check_root(root)
    if percent == "inference":
        split = "inference"
        percent = 100
    if split not in OOD_SPLITS:
        raise ValueError(f"split must be one of {OOD_SPLITS}, got {split!r}")
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise ValueError(
            f"percent must be an integer in 1..100 (release: {OOD_PERCENTS}) or 'inference', got {percent!r}"
        )
    if shift is not None and shift not in OOD_SHIFTS:
        raise ValueError(f"shift must be one of {OOD_SHIFTS}, got {shift!r}")
    shifts = [shift] if shift is not None else [name for name in OOD_SHIFTS if (root / name).is_dir()]
    records: list[MedSegRecord] = []
    for shift_name in shifts:
        shift_dir = root / shift_name
        if not shift_dir.is_dir():
            raise ValueError(f"{shift_dir} does not exist")
        for task_dir in _subdirs(shift_dir):
            if task is not None and task_dir.name != task:
                continue
            modality, target, context = _task_context(task_dir)
            for dataset_dir in _subdirs(task_dir):
                if dataset is not None and dataset_dir.name != dataset:
                    continue
                if any((dataset_dir / name).is_dir() for name in OOD_SPLITS):
                    bases = [(None, dataset_dir)]
                else:
                    bases = [(sequence_dir.name, sequence_dir) for sequence_dir in _subdirs(dataset_dir)
                             if (sequence_dir / split).is_dir()]
                for sequence, base in bases:
                    if not (base / split).is_dir():
                        raise ValueError(f"{base} has no {split}/ folder")
                    records.extend(
                        MedSegRecord(image_path, gt_path, dataset_dir.name, modality, target, sequence, context,
                                     shift=shift_name)
                        for image_path, gt_path in _paired_files(_split_dir(base, split, percent))
                    )
    if not records:
        raise ValueError(
            f"no MedSegDB OOD cases under {root} for split={split!r}, percent={percent}, shift={shift!r}, "
            f"task={task!r}, dataset={dataset!r}: expected "
            "<root>/<shift>/<Modality>_<Target>/<dataset>[/<sequence>]/finetune/<NNN>_percent|inference/"
            f"{IMAGES_FOLDER}|{MASKS_FOLDER}"
        )
    return records


def _mask_is_empty(gt_path: Path) -> bool:
    return not np.load(gt_path, mmap_mode="r").any()


class MedSegDBDataset(Dataset):
    """MedSegDB cases as model-ready dicts in the 256 x 256 frame (see the module docstring).

    Records whose ground truth is empty are dropped at construction (every gt file is
    read once, memory-mapped); their number is ``skipped_empty`` and logged once.

    Box: the tight bounding box of the mask, ``[x_min, y_min, x_max, y_max]`` pixel
    indices, scaled into the 256 frame the way the predictor maps a user box. With
    ``jitter > 0`` each side is pushed outwards independently by an integer drawn
    uniformly from ``0..jitter-1`` (``TRAIN_BOX_JITTER = 20`` gives the paper's 0..19 px)
    and clipped to the image (0..255 for a 256 x 256 image). The draws come from
    ``generator`` if given, else from torch's global RNG: the latter is what DataLoader
    seeds per worker (``base_seed + worker_id``), so runs are reproducible under
    ``torch.manual_seed`` and ``DistributedSampler``; a generator passed here is copied
    unchanged into every worker, so use it with ``num_workers=0``.

    Args:
        records: cases from ``scan_id_layout`` / ``scan_ood_layout``.
        jitter: box jitter bound in pixels of the 256 frame; 0 (default, evaluation)
            gives the exact box.
        generator: optional RNG for the jitter.
        skip_empty: drop records whose mask is empty (default). With ``False`` an empty
            mask gets the whole-image box.
        normalize: the model's pixel normalisation (default SAM's, ``medsegx.items.PixelNormalize``,
            which every backbone uses; picklable, so DataLoader workers can run it).

    Raises:
        ValueError: if ``jitter`` is negative or ``records`` is empty.
    """

    def __init__(
        self,
        records: Sequence[MedSegRecord],
        jitter: int = 0,
        generator: torch.Generator | None = None,
        skip_empty: bool = True,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"jitter must be an integer >= 0 (pixels), got {jitter!r}")
        if len(records) == 0:
            raise ValueError("records is empty: nothing to read")
        self.jitter = jitter
        self.generator = generator
        self.normalize = normalize or PixelNormalize()
        self.skipped_empty = 0
        records = list(records)
        if skip_empty:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                empty = list(pool.map(_mask_is_empty, (record.gt_path for record in records), chunksize=64))
            self.skipped_empty = sum(empty)
            records = [record for record, is_empty in zip(records, empty) if not is_empty]
            if self.skipped_empty:
                logger.info("skipped %d of %d MedSegDB cases with an empty mask", self.skipped_empty, len(empty))
        self.records: list[MedSegRecord] = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        record = self.records[index]
        image = _load_image(record.image_path)
        mask = _load_mask(record.gt_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"ground truth {record.gt_path} is {mask.shape} but image {record.image_path} is {image.shape[:2]}"
            )
        item = item_from_arrays(image, mask, record.context, self.normalize, allow_empty=True)
        if self.jitter > 0 and mask.any():
            item["box"] = jitter_box(item["box"], item["valid_hw"], self.jitter, generator=self.generator)
        return {**item, "path": str(record.image_path)}


def _load_image(path: Path) -> np.ndarray:
    """Loads an ``H x W x 3`` image (``H x W`` and ``H x W x 1`` grey images are repeated)."""
    image = np.load(path)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {path} has shape {image.shape}, expected H x W x 3")
    return np.ascontiguousarray(image, dtype=np.float32)


def _load_mask(path: Path) -> np.ndarray:
    """Loads an ``H x W`` ground truth as bool (any value > 0 is foreground)."""
    mask = np.load(path)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"ground truth {path} has shape {mask.shape}, expected H x W")
    return mask > 0


class MedSegDBIDDataset(MedSegDBDataset):
    """The ID / train tree as a dataset (``scan_id_layout`` + ``MedSegDBDataset``).

    Args:
        root: the ID root folder.
        jitter: box jitter bound (``TRAIN_BOX_JITTER`` for training, 0 for evaluation).
        generator: optional RNG for the jitter.
        skip_empty: drop cases whose mask is empty.
        datasets: only these dataset folders.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        jitter: int = 0,
        generator: torch.Generator | None = None,
        skip_empty: bool = True,
        datasets: Sequence[str] | None = None,
    ) -> None:
        super().__init__(scan_id_layout(root, datasets=datasets), jitter=jitter, generator=generator,
                         skip_empty=skip_empty)


class MedSegDBOODDataset(MedSegDBDataset):
    """One split of the OOD / real-world tree as a dataset (``scan_ood_layout`` + ``MedSegDBDataset``).

    Args:
        root: the OOD root folder.
        split: ``"finetune"`` or ``"inference"``.
        percent: fine-tune fraction (5 / 15 / 25 / 50 / 100).
        shift: only ``"cross_site"`` or ``"cross_task"``.
        task: only this ``<Modality>_<Target>`` folder.
        dataset: only this dataset folder.
        jitter: box jitter bound (``TRAIN_BOX_JITTER`` for fine-tuning, 0 for inference).
        generator: optional RNG for the jitter.
        skip_empty: drop cases whose mask is empty.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "finetune",
        percent: int | str = 100,
        shift: str | None = None,
        task: str | None = None,
        dataset: str | None = None,
        jitter: int = 0,
        generator: torch.Generator | None = None,
        skip_empty: bool = True,
    ) -> None:
        records = scan_ood_layout(root, split=split, percent=percent, shift=shift, task=task, dataset=dataset)
        super().__init__(records, jitter=jitter, generator=generator, skip_empty=skip_empty)


# (dataset, <Modality>_<Target>, sequence) written by write_synthetic_medsegdb; real
# MedSegDB task names so that they resolve in the taxonomy.
SYNTHETIC_ID_TASKS = (
    ("SynthLiverCT", "CT_Liver", None),
    ("SynthProstateMR", "MRI_ProstatePeripheralZone", "T2"),
    ("SynthThyroidUS", "US_ThyroidNodule", None),
)
# (shift, <Modality>_<Target>, dataset, sequence); StomachCancer is outside the task list
# (an unseen task, the free task row).
SYNTHETIC_OOD_TASKS = (
    ("cross_site", "CT_Liver", "SynthSiteLiverCT", None),
    ("cross_site", "MRI_ProstatePeripheralZone", "SynthSiteProstateMR", "T2"),
    ("cross_task", "CT_StomachCancer", "SynthStomachCT", None),
)


def _synthetic_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``size x size x 3`` uint8 image with a bright ellipse or rectangle and its mask."""
    rows, cols = np.mgrid[0:size, 0:size]
    centre_row, centre_col = rng.uniform(0.3, 0.7, size=2) * size
    radius_row, radius_col = rng.uniform(0.08, 0.22, size=2) * size
    if rng.random() < 0.5:
        mask = ((rows - centre_row) / radius_row) ** 2 + ((cols - centre_col) / radius_col) ** 2 <= 1.0
    else:
        mask = (np.abs(rows - centre_row) <= radius_row) & (np.abs(cols - centre_col) <= radius_col)
    background, foreground = rng.uniform(30, 90), rng.uniform(150, 220)
    grey = np.where(mask, foreground, background) + rng.normal(0.0, 12.0, size=(size, size))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), mask.astype(np.uint8)


def _write_cases(case_dir: Path, cases: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
    (case_dir / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    (case_dir / MASKS_FOLDER).mkdir(parents=True, exist_ok=True)
    for name, image, mask in cases:
        np.save(case_dir / IMAGES_FOLDER / f"{name}.npy", image)
        np.save(case_dir / MASKS_FOLDER / f"{name}.npy", mask)


def write_synthetic_medsegdb(
    root: str | os.PathLike, layout: str = "id", n_cases: int = 4, size: int = 256, seed: int = 0
) -> Path:
    """Writes a tiny synthetic MedSegDB tree (for tests and benchmarks).

    Every case is a noisy grey image (repeated to 3 channels, uint8) with one bright
    ellipse or rectangle, and its {0, 1} mask; no mask is empty. Task folders use real
    MedSegDB names (``SYNTHETIC_ID_TASKS`` / ``SYNTHETIC_OOD_TASKS``), including a
    sequence sub-folder (``MRI_ProstatePeripheralZone/.../T2``).

    - ``layout="id"``: ``n_cases`` cases per task.
    - ``layout="ood"``: per task, a fine-tune pool of ``n_cases`` cases whose first
      ``max(1, round(n_cases * p / 100))`` go to ``finetune/<p:03d>_percent`` for each p in
      ``OOD_PERCENTS`` (nested subsets, like the release), and ``n_cases`` other cases in
      ``inference/``.

    Args:
        root: output folder (created; existing files of the same name are overwritten).
        layout: ``"id"`` or ``"ood"``.
        n_cases: cases per task (per split for ``"ood"``).
        size: image side in pixels (256 like the release; e.g. 64 exercises the resize).
        seed: seed of the numpy RNG; the same arguments write identical files.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: for an unknown layout, ``n_cases < 1`` or ``size < 16``.
    """
    if layout not in ("id", "ood"):
        raise ValueError(f"layout must be 'id' or 'ood', got {layout!r}")
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)

    def make_cases(prefix: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return [(f"{prefix}_{index:04d}", *_synthetic_case(rng, size)) for index in range(n_cases)]

    if layout == "id":
        for dataset, task_folder, sequence in SYNTHETIC_ID_TASKS:
            case_dir = root / dataset / task_folder
            if sequence is not None:
                case_dir = case_dir / sequence
            _write_cases(case_dir, make_cases(dataset))
    else:
        for shift, task_folder, dataset, sequence in SYNTHETIC_OOD_TASKS:
            base = root / shift / task_folder / dataset
            if sequence is not None:
                base = base / sequence
            pool = make_cases(f"{dataset}_ft")
            for percent in OOD_PERCENTS:
                count = max(1, round(n_cases * percent / 100))
                _write_cases(base / "finetune" / f"{percent:03d}_percent", pool[:count])
            _write_cases(base / "inference", make_cases(f"{dataset}_inf"))
    logger.info("wrote a synthetic MedSegDB %s tree to %s", layout, root)
    return root
