"""Real labelled volumes that install offline, fetched on first use into a git-ignored cache.

Nothing here is committed: each source is fetched from a package registry the first time a
benchmark asks for it and kept under ``sample-data/real/`` (``--cache`` elsewhere). Sources and
licences are listed in ``sample-data/README.md``.

- **TotalSegmentator 2.18.0** (Apache-2.0): its source archive from PyPI
  (``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0``) holds
  ``tests/reference_files/``: a real abdominal CT (``example_ct_sm``, 3 mm) and a real abdominal
  MR (``example_mr_sm``, 3 mm) with TotalSegmentator's own multi-label outputs
  (``example_seg``, ``example_seg_mr``). Those masks are **model-made** (TotalSegmentator's
  predictions, a "silver standard"), not drawn by hand; class names come from the archive's
  ``totalsegmentator/map_to_binary.py``.
- **Colin27 + AAL** from Debian's ``mricron-data`` (BSD-3-clause; ``apt-get download``, unpacked
  with ``dpkg -x``, not installed): ``ch2.nii.gz`` (the Colin27 T1 MRI) and ``aal.nii.gz``, the
  **hand-drawn** AAL atlas of the same brain on the same 1 mm grid (116 regions,
  Tzourio-Mazoyer et al., NeuroImage 2002), names in ``aal.nii.txt``.
- **MNI152** from nilearn (already used by the sample studies; ``build_sample_data.py``): the
  T1 template with its grey / white matter maps (probability maps thresholded there).
- **MNI152 + AAL** (``mni152_aal``): a second brain for the AAL structures, the nilearn MNI152 T1
  (1 mm) with the Colin27 AAL atlas carried over by MNI coordinates (nearest neighbour) and the
  shift ``AAL_TO_MNI152_SHIFT_MM``. These labels are **atlas-transferred**, not drawn on this
  image: approximate at the boundaries (an average brain, a single-subject atlas).

Usage (as a library)::

    from real_data import load_cases
    for case in load_cases(["totalseg_ct", "colin27_aal"]):
        ...  # case.image (Z, H, W), case.masks {name: (Z, H, W) bool}
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "real"
TOTALSEG_VERSION = "2.18.0"
TOTALSEG_FILES = {
    "example_ct_sm.nii.gz": "tests/reference_files/example_ct_sm.nii.gz",
    "example_seg.nii.gz": "tests/reference_files/example_seg.nii.gz",
    "example_mr_sm.nii.gz": "tests/reference_files/example_mr_sm.nii.gz",
    "example_seg_mr.nii.gz": "tests/reference_files/example_seg_mr.nii.gz",
    "map_to_binary.py": "totalsegmentator/map_to_binary.py",
    "LICENSE": "LICENSE",
}
MRICRON_FILES = ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")
#: Structures per source: abdominal organs of TotalSegmentator's ``total`` / ``total_mr`` maps,
#: deep grey-matter regions of the AAL atlas (left side), MNI152's tissue maps.
TOTALSEG_CT = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach", "aorta", "gallbladder")
TOTALSEG_MR = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach", "aorta")
AAL = {"hippocampus": "Hippocampus_L", "amygdala": "Amygdala_L", "caudate": "Caudate_L",
       "putamen": "Putamen_L", "thalamus": "Thalamus_L"}
#: Added to MNI152 world coordinates before looking up the AAL atlas: Colin27 sits a few mm off the
#: ICBM 2009a template. Fitted by the grey-matter probability under the five AAL structures (1 mm
#: steps, +-4 mm): 0.728 at no shift, 0.796 at this one (the best of the search).
AAL_TO_MNI152_SHIFT_MM = (0.0, 2.0, 3.0)
SOURCES = ("totalseg_ct", "totalseg_mr", "colin27_aal", "mni152", "mni152_aal")


@dataclass
class Case:
    """One labelled volume in the app's ``(Z, H, W)`` frame (NIfTI ``(i, j, k)`` transposed)."""

    source: str
    modality: str
    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    model_made: bool = False
    note: str = ""
    #: the image's NIfTI affine (voxel (i, j, k) -> world mm); ``None`` where the source has none
    affine: np.ndarray | None = None

    @property
    def spacing_zhw(self) -> tuple[float, float, float]:
        """Voxel size in mm along the ``(Z, H, W)`` axes (1 mm when the affine is unknown)."""
        if self.affine is None:
            return (1.0, 1.0, 1.0)
        i, j, k = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return (float(k), float(j), float(i))


class FetchError(RuntimeError):
    """A source could not be fetched (no registry access, no apt): the message says which and how."""


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        subprocess.run(command, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise FetchError(f"{what}: {command[0]} not found") from None
    except subprocess.CalledProcessError as err:
        raise FetchError(f"{what}: {' '.join(command)} failed: {err.stderr.strip()[-500:]}") from None


def fetch_totalsegmentator(cache: Path = DEFAULT_CACHE) -> Path:
    """``<cache>/totalsegmentator/`` with the reference volumes, the class map and the licence."""
    target = cache / "totalsegmentator"
    if all((target / name).is_file() for name in TOTALSEG_FILES):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", tmp,
              f"totalsegmentator=={TOTALSEG_VERSION}"], "TotalSegmentator source archive")
        archive = next(Path(tmp).glob("totalsegmentator-*.tar.gz"))
        root = f"totalsegmentator-{TOTALSEG_VERSION}/"
        with tarfile.open(archive) as tar:
            target.mkdir(parents=True, exist_ok=True)
            for name, member in TOTALSEG_FILES.items():
                source = tar.extractfile(root + member)
                if source is None:
                    raise FetchError(f"{archive.name} has no {member}")
                with open(target / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    return target


def fetch_mricron(cache: Path = DEFAULT_CACHE) -> Path:
    """``<cache>/mricron/`` with Colin27 (``ch2``) and the AAL atlas, from Debian's ``mricron-data``."""
    target = cache / "mricron"
    if all((target / name).is_file() for name in MRICRON_FILES):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", "mricron-data"], "Debian mricron-data (run `apt-get update` first?)", cwd=Path(tmp))
        deb = next(Path(tmp).glob("mricron-data_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], "unpacking mricron-data")
        templates = Path(tmp) / "x" / "usr" / "share" / "mricron" / "templates"
        target.mkdir(parents=True, exist_ok=True)
        for name in MRICRON_FILES:
            shutil.copy(templates / name, target / name)
        shutil.copy(Path(tmp) / "x" / "usr" / "share" / "doc" / "mricron-data" / "copyright", target / "copyright")
    return target


def _zhw(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(nib.load(path).dataobj).transpose(2, 1, 0))


def _class_map(folder: Path, task: str) -> dict[int, str]:
    namespace: dict = {}
    exec(compile((folder / "map_to_binary.py").read_text(), "map_to_binary.py", "exec"), namespace)  # a dict literal
    return {int(value): name for value, name in namespace["class_map"][task].items()}


def totalsegmentator_case(modality: str, cache: Path = DEFAULT_CACHE) -> Case:
    folder = fetch_totalsegmentator(cache)
    image, seg, task, wanted = (("example_ct_sm", "example_seg", "total", TOTALSEG_CT) if modality == "CT"
                                else ("example_mr_sm", "example_seg_mr", "total_mr", TOTALSEG_MR))
    labels = _zhw(folder / f"{seg}.nii.gz")
    by_name = {name: value for value, name in _class_map(folder, task).items()}
    masks = {name: labels == by_name[name] for name in wanted if (labels == by_name[name]).any()}
    return Case(f"totalseg_{modality.lower()}", "CT" if modality == "CT" else "MRI", _zhw(folder / f"{image}.nii.gz"),
                masks, model_made=True, note=f"TotalSegmentator {TOTALSEG_VERSION} output (model-made)",
                affine=nib.load(folder / f"{image}.nii.gz").affine)


def colin27_case(cache: Path = DEFAULT_CACHE) -> Case:
    folder = fetch_mricron(cache)
    atlas = _zhw(folder / "aal.nii.gz")
    codes = _aal_codes(folder)
    masks = {name: atlas == codes[region] for name, region in AAL.items()}
    return Case("colin27_aal", "MRI", _zhw(folder / "ch2.nii.gz"), masks, note="AAL atlas (hand-drawn)",
                affine=nib.load(folder / "ch2.nii.gz").affine)


def _aal_codes(folder: Path) -> dict[str, int]:
    """AAL region name -> its value in ``aal.nii.gz`` (``aal.nii.txt``: index, name, code)."""
    codes = {}
    for line in (folder / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            codes[parts[1]] = int(parts[0])
    return codes


def mni152_case() -> Case:
    sys.path.insert(0, str(HERE))
    from build_sample_data import build

    with tempfile.TemporaryDirectory() as tmp:
        datastore = Path(tmp) / "datastore"
        build(datastore)
        image = _zhw(datastore / "mni152_t1.nii.gz")
        labels = _zhw(datastore / "labels" / "final" / "mni152_t1.nii.gz")
        names = json.loads((datastore / "mni152_t1_labels.json").read_text())
    return Case("mni152", "MRI", image, {name: labels == value for name, value in names.items()},
                note="nilearn MNI152 tissue maps (thresholded probability maps)")


def mni152_aal_case(cache: Path = DEFAULT_CACHE) -> Case:
    """The MNI152 T1 (1 mm) with the Colin27 AAL structures transferred onto it (module doc)."""
    sys.path.insert(0, str(HERE))
    from build_sample_data import mni152_intensity
    from nilearn.datasets import load_mni152_template  # the package's own copy: no download

    folder = fetch_mricron(cache)
    t1 = load_mni152_template(resolution=1)
    atlas = nib.load(folder / "aal.nii.gz")
    voxels = np.indices(t1.shape).reshape(3, -1)
    world = t1.affine[:3, :3] @ voxels + (t1.affine[:3, 3] + np.asarray(AAL_TO_MNI152_SHIFT_MM))[:, None]
    inverse = np.linalg.inv(atlas.affine)
    atlas_voxels = np.rint(inverse[:3, :3] @ world + inverse[:3, 3:]).astype(int)
    inside = np.all((atlas_voxels >= 0) & (atlas_voxels < np.asarray(atlas.shape)[:, None]), axis=0)
    values = np.asarray(atlas.dataobj)
    labels = np.zeros(voxels.shape[1], dtype=values.dtype)
    labels[inside] = values[tuple(atlas_voxels[:, inside])]
    labels = np.ascontiguousarray(labels.reshape(t1.shape).transpose(2, 1, 0))
    codes = _aal_codes(folder)
    return Case("mni152_aal", "MRI", np.ascontiguousarray(mni152_intensity(t1).transpose(2, 1, 0)),
                {name: labels == codes[region] for name, region in AAL.items()},
                note="AAL atlas transferred from Colin27 (approximate)")


def load_cases(sources: Iterable[str] = SOURCES, cache: Path = DEFAULT_CACHE) -> list[Case]:
    """The cases of ``sources`` (names in ``SOURCES``), fetched into ``cache`` when missing."""
    loaders = {"totalseg_ct": lambda: totalsegmentator_case("CT", cache),
               "totalseg_mr": lambda: totalsegmentator_case("MR", cache),
               "colin27_aal": lambda: colin27_case(cache), "mni152": mni152_case,
               "mni152_aal": lambda: mni152_aal_case(cache)}
    unknown = sorted(set(sources) - set(loaders))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; choose from {', '.join(SOURCES)}")
    return [loaders[name]() for name in sources]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the real labelled volumes into the cache and list them.")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    try:
        cases = load_cases(args.sources, args.cache)
    except FetchError as err:
        print(f"real_data: {err}", file=sys.stderr)
        return 2
    for case in cases:
        sizes = ", ".join(f"{name} {int(mask.any(axis=(1, 2)).sum())} slices" for name, mask in case.masks.items())
        print(f"{case.source} ({case.modality}, {case.image.shape}, {case.note}): {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
