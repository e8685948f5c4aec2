"""Run configuration: argparse -> one dataclass -> a YAML copy next to the outputs.

Every CLI option is parsed once, here, into ``TrainConfig`` (pretrain / fine-tune) or
``EvalConfig`` (evaluate). Defaults are the MedSegX paper recipe (``spec/conmoae.md``,
"Training recipe"): ViT-B at 256 px, 4 experts, bottleneck 16, embedding 16, AdamW lr 1e-3
(fine-tune 5e-5), weight decay 0.01, 30 epochs, global batch 1024 (8 GPUs x 128), Dice + BCE
minimum over the 3 masks, box sides pushed out by 0..19 px.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medsegx.build import MODEL_REGISTRY
from medsegx.checkpoint import SAM_DOWNLOAD_URLS
from medsegx.data import OOD_PERCENTS, OOD_SHIFTS
from medsegx.items import TRAIN_BOX_JITTER
from medsegx.modeling import ConMoAEConfig

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
LAYOUTS = ("id", "ood")
LR_SCHEDULES = ("warmup_cosine", "constant")
VAL_METRICS = ("dice_oracle", "dice_by_iou")
CONFIG_FILE = "config.yaml"
# Paper learning rates per stage.
DEFAULT_LR = {"pretrain": 1e-3, "finetune": 5e-5}


class ConfigError(ValueError):
    """A configuration that cannot run (the message names the option and the bad value)."""


@dataclass
class DataConfig:
    """Where one dataset lives and which part of it to read.

    Attributes:
        root: MedSegDB root folder (``id``: ``<root>/<dataset>/<Modality>_<Target>/...``;
            ``ood``: ``<root>/<shift>/<Modality>_<Target>/<dataset>/...``).
        layout: ``"id"`` or ``"ood"``.
        split: OOD only: ``"finetune"`` or ``"inference"``.
        percent: OOD fine-tune fraction (5 / 15 / 25 / 50 / 100).
        datasets: ID only: dataset folders to read (default all).
        shift: OOD only: ``"cross_site"`` or ``"cross_task"`` (default both).
        task: OOD only: one ``<Modality>_<Target>`` folder.
        dataset: OOD only: one dataset folder.
    """

    root: str
    layout: str = "id"
    split: str = "finetune"
    percent: int = 100
    datasets: list[str] | None = None
    shift: str | None = None
    task: str | None = None
    dataset: str | None = None

    def validate(self, what: str) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{what}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not Path(self.root).is_dir():
            raise ConfigError(f"{what}: {self.root} is not a directory")
        if self.layout == "ood" and self.shift is not None and self.shift not in OOD_SHIFTS:
            raise ConfigError(f"{what}: shift must be one of {OOD_SHIFTS}, got {self.shift!r}")
        if self.layout == "ood" and not 1 <= int(self.percent) <= 100:
            raise ConfigError(f"{what}: percent must be in 1..100 (release: {OOD_PERCENTS}), got {self.percent!r}")


@dataclass
class TrainConfig:
    """One pretraining or fine-tuning run (see the module docstring for the paper defaults)."""

    stage: str
    train: DataConfig
    output_dir: str
    val: DataConfig | None = None
    # model
    backbone: str = "vit_b"
    sam_checkpoint: str | None = None
    init_checkpoint: str | None = None
    num_experts: int = 4
    bottleneck_dim: int = 16
    embedding_dim: int = 16
    adapter_dropout: float = 0.1
    # optimisation
    epochs: int = 30
    global_batch: int = 1024
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    lr_schedule: str = "warmup_cosine"
    warmup_epochs: float = 5.0
    box_jitter: int = TRAIN_BOX_JITTER
    iou_loss_weight: float = 0.0
    # runtime
    device: str = "auto"
    amp: bool = True
    num_workers: int = 4
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    stop_after_epoch: int | None = None
    resume: str | None = None
    val_metric: str = "dice_oracle"
    tensorboard: bool = True
    progress: bool = True

    @property
    def conmoae(self) -> ConMoAEConfig:
        return ConMoAEConfig(num_experts=self.num_experts, bottleneck_dim=self.bottleneck_dim,
                             embedding_dim=self.embedding_dim)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step so that ``batch_size x world_size x steps == global_batch``.

        Raises:
            ConfigError: if the global batch is not a multiple of ``batch_size x world_size``.
        """
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"--global-batch {self.global_batch} is not divisible by --batch-size {self.batch_size} x "
                f"{world_size} process(es) = {per_step}; choose a per-device batch that divides "
                f"{self.global_batch // world_size if self.global_batch % world_size == 0 else self.global_batch}"
            )
        return self.global_batch // per_step

    def validate(self) -> None:
        """Checks what can be checked before touching data or weights.

        Raises:
            ConfigError: naming the option and its bad value.
        """
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.backbone not in MODEL_REGISTRY:
            raise ConfigError(f"--backbone must be one of {', '.join(MODEL_REGISTRY)}, got {self.backbone!r}")
        if self.stage == "finetune" and not self.init_checkpoint:
            raise ConfigError("fine-tuning starts from a pretrained MedSegX checkpoint: pass --checkpoint PATH")
        for name in ("epochs", "global_batch", "batch_size", "num_experts", "bottleneck_dim", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.global_batch % self.batch_size:
            raise ConfigError(f"--global-batch {self.global_batch} is not divisible by --batch-size {self.batch_size}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ConfigError(f"--adapter-dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr!r} min_lr={self.min_lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.box_jitter < 0:
            raise ConfigError(f"--box-jitter must be >= 0, got {self.box_jitter!r}")
        if self.iou_loss_weight < 0:
            raise ConfigError(f"--iou-loss-weight must be >= 0, got {self.iou_loss_weight!r}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch!r}")
        if self.stop_after_epoch is not None and not 1 <= self.stop_after_epoch <= self.epochs:
            raise ConfigError(f"--stop-after-epoch must be in 1..{self.epochs}, got {self.stop_after_epoch!r}")
        if self.val_metric not in VAL_METRICS:
            raise ConfigError(f"--val-metric must be one of {VAL_METRICS}, got {self.val_metric!r}")
        _check_weight_files(self.backbone, self.sam_checkpoint, self.init_checkpoint)
        self.train.validate("training data")
        if self.val is not None:
            self.val.validate("validation data")


@dataclass
class EvalConfig:
    """One evaluation run: a checkpoint on one or more test sets.

    ``data`` holds one ``DataConfig`` per test set; each image's split in the summary is
    ``id`` or its OOD shift (``medsegx_training.loaders.split_name``).
    """

    output_dir: str
    data: list[DataConfig] = field(default_factory=list)
    backbone: str = "vit_b"
    sam_checkpoint: str | None = None
    checkpoint: str | None = None
    num_experts: int = 4
    bottleneck_dim: int = 16
    embedding_dim: int = 16
    batch_size: int = 64
    device: str = "auto"
    amp: bool = True
    num_workers: int = 4
    nsd_tolerance: float = 2.0
    limit: int | None = None
    progress: bool = True

    @property
    def conmoae(self) -> ConMoAEConfig:
        return ConMoAEConfig(num_experts=self.num_experts, bottleneck_dim=self.bottleneck_dim,
                             embedding_dim=self.embedding_dim)

    def validate(self) -> None:
        if self.backbone not in MODEL_REGISTRY:
            raise ConfigError(f"--backbone must be one of {', '.join(MODEL_REGISTRY)}, got {self.backbone!r}")
        if not self.data:
            raise ConfigError("nothing to evaluate: pass --id-root and/or --ood-root")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size!r}")
        if self.nsd_tolerance < 0:
            raise ConfigError(f"--nsd-tolerance must be >= 0, got {self.nsd_tolerance!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit!r}")
        _check_weight_files(self.backbone, self.sam_checkpoint, self.checkpoint)
        for data in self.data:
            data.validate("evaluation data")


def _check_weight_files(backbone: str, sam_checkpoint: str | None, checkpoint: str | None) -> None:
    if backbone.startswith("vit_") and not sam_checkpoint:
        raise ConfigError(
            f"--backbone {backbone} needs the official SAM weights: pass --sam-checkpoint sam_{backbone}_*.pth "
            f"(download {SAM_DOWNLOAD_URLS.get(backbone, 'it')} on a machine with internet access), "
            "or use --backbone lite (embedded weights)"
        )
    if sam_checkpoint and not Path(sam_checkpoint).is_file():
        raise ConfigError(f"--sam-checkpoint {sam_checkpoint} does not exist "
                          f"(official file: {SAM_DOWNLOAD_URLS.get(backbone, 'see segment-anything')})")
    if checkpoint and not Path(checkpoint).is_file():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist")


# -- argparse ---------------------------------------------------------------------------------

def _add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default="vit_b", choices=list(MODEL_REGISTRY),
                       help="vit_b (paper; needs --sam-checkpoint), lite (embedded LiteMedSAM weights), "
                            "tiny_vit / tiny_lite (random tiny models, for tests); default %(default)s")
    group.add_argument("--sam-checkpoint", help="official SAM file for a ViT backbone, e.g. sam_vit_b_01ec64.pth")
    group.add_argument("--num-experts", type=int, default=4, help="ConMoAE experts K (paper 4)")
    group.add_argument("--bottleneck-dim", type=int, default=16, help="adapter bottleneck (paper 16)")
    group.add_argument("--embedding-dim", type=int, default=16, help="context embedding width (paper 16)")
    return group


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto",
                       help="auto (cuda:LOCAL_RANK if available, else cpu), cpu or cuda; default %(default)s")
    group.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on GPU")
    group.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    return group


def build_train_parser(stage: str) -> argparse.ArgumentParser:
    """The ``medsegx-pretrain`` / ``medsegx-finetune`` parser (paper defaults for ``stage``)."""
    pretrain = stage == "pretrain"
    parser = argparse.ArgumentParser(
        prog=f"medsegx-{stage}",
        description=("Pretrain ConMoAE-SAM on the MedSegDB ID/train tree." if pretrain else
                     "Fine-tune a pretrained MedSegX checkpoint on an OOD / real-world task split.")
                    + " Launch with torchrun for several GPUs (global batch stays --global-batch).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-root", required=True,
                      help="MedSegDB root: the ID/train tree" + ("" if pretrain else " or the OOD tree (see --layout)"))
    data.add_argument("--layout", choices=LAYOUTS, default="id" if pretrain else "ood",
                      help="id: <root>/<dataset>/<Modality>_<Target>/...; ood: <root>/<shift>/<Modality>_<Target>/<dataset>/...")
    data.add_argument("--percent", type=int, default=100, help="OOD fine-tune split: 5, 15, 25, 50 or 100 (%%)")
    data.add_argument("--datasets", nargs="+", help="ID layout: only these dataset folders")
    data.add_argument("--shift", choices=OOD_SHIFTS, help="OOD layout: only this shift")
    data.add_argument("--task", help="OOD layout: only this <Modality>_<Target> folder, e.g. CT_Liver")
    data.add_argument("--dataset", help="OOD layout: only this dataset folder")
    data.add_argument("--val-root", help="held-out data validated every epoch (best checkpoint saved as best.pth)")
    data.add_argument("--val-layout", choices=LAYOUTS, default="id", help="layout of --val-root")
    data.add_argument("--val-split", choices=("finetune", "inference"), default="inference",
                      help="OOD --val-root: which split (inference is the test split: selecting on it is optimistic)")
    data.add_argument("--val-percent", type=int, default=100, help="OOD --val-root with --val-split finetune: percent")
    data.add_argument("--output-dir", required=True, help="checkpoints, logs, plots and config.yaml go here")

    model = _add_model_arguments(parser)
    model.add_argument("--checkpoint", dest="init_checkpoint", required=not pretrain,
                       help=("MedSegX checkpoint to start from (optional)" if pretrain else
                             "pretrained MedSegX checkpoint to fine-tune (required)"))
    model.add_argument("--adapter-dropout", type=float, default=0.1, help="dropout inside each expert (paper 0.1)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30)
    optim.add_argument("--global-batch", type=int, default=1024,
                       help="images per optimizer step over all processes (= batch-size x world size x accumulation)")
    optim.add_argument("--batch-size", type=int, default=128, help="images per process per forward pass")
    optim.add_argument("--lr", type=float, default=DEFAULT_LR[stage], help="AdamW peak learning rate")
    optim.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine schedule")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="warmup_cosine",
                       help="warmup_cosine: linear warmup then per-step cosine to --min-lr (official code); constant")
    optim.add_argument("--warmup-epochs", type=float, default=5.0)
    optim.add_argument("--box-jitter", type=int, default=TRAIN_BOX_JITTER,
                       help="each box side pushed out by a uniform integer in 0..N-1 px (paper 20: 0..19 px); 0 = exact")
    optim.add_argument("--iou-loss-weight", type=float, default=0.0,
                       help="weight of an MSE loss between predicted and actual IoU (0 = paper loss only; "
                            ">0 trains the IoU head used by the honest by-IoU mask choice)")

    runtime = _add_runtime_arguments(parser)
    runtime.add_argument("--seed", type=int, default=0)
    runtime.add_argument("--deterministic", action="store_true",
                         help="torch deterministic algorithms, no cuDNN benchmark (slower)")
    runtime.add_argument("--max-steps-per-epoch", type=int, help="cap optimizer steps per epoch (smoke tests)")
    runtime.add_argument("--stop-after-epoch", type=int,
                         help="end this run after that epoch (e.g. a job time limit); continue with --resume")
    runtime.add_argument("--resume", help="last.pth to continue from, or 'auto' (OUTPUT_DIR/last.pth if present)")
    runtime.add_argument("--val-metric", choices=VAL_METRICS, default="dice_oracle",
                         help="validation mean Dice that picks best.pth")
    runtime.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    return parser


def train_config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    """Namespace of ``build_train_parser(stage)`` -> ``TrainConfig``."""
    train = DataConfig(root=args.data_root, layout=args.layout, split="finetune", percent=args.percent,
                       datasets=args.datasets, shift=args.shift, task=args.task, dataset=args.dataset)
    val = None
    if args.val_root:
        val = DataConfig(root=args.val_root, layout=args.val_layout, split=args.val_split, percent=args.val_percent,
                         shift=args.shift if args.val_layout == "ood" else None,
                         task=args.task if args.val_layout == "ood" else None)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"stage", "train", "val"}
    return TrainConfig(stage=stage, train=train, val=val,
                       **{name: getattr(args, name) for name in names if hasattr(args, name)})


def build_eval_parser() -> argparse.ArgumentParser:
    """The ``medsegx-evaluate`` parser."""
    parser = argparse.ArgumentParser(
        prog="medsegx-evaluate",
        description="Per-image DSC / HD95 / NSD of a MedSegX checkpoint on MedSegDB test sets, with the paper's "
                    "oracle best-of-3 mask and the honest by-predicted-IoU choice (CSV + markdown summary).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--id-root", help="ID test tree (<root>/<dataset>/<Modality>_<Target>/...)")
    data.add_argument("--datasets", nargs="+", help="ID tree: only these dataset folders")
    data.add_argument("--ood-root", help="OOD / real-world tree; its inference/ split is evaluated")
    data.add_argument("--shift", choices=OOD_SHIFTS, help="OOD tree: only this shift")
    data.add_argument("--task", help="OOD tree: only this <Modality>_<Target> folder")
    data.add_argument("--output-dir", required=True, help="per_image.csv, summary.md, summary.json, config.yaml")
    model = _add_model_arguments(parser)
    model.add_argument("--checkpoint", help="MedSegX checkpoint (default: the backbone's weights alone)")
    runtime = _add_runtime_arguments(parser)
    runtime.add_argument("--batch-size", type=int, default=64)
    runtime.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in pixels (paper 2)")
    runtime.add_argument("--limit", type=int, help="evaluate at most this many images per test set (smoke tests)")
    return parser


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    data = []
    if args.id_root:
        data.append(DataConfig(root=args.id_root, layout="id", datasets=args.datasets))
    if args.ood_root:
        data.append(DataConfig(root=args.ood_root, layout="ood", split="inference", shift=args.shift, task=args.task))
    names = {f.name for f in dataclasses.fields(EvalConfig)} - {"data"}
    return EvalConfig(data=data, **{name: getattr(args, name) for name in names if hasattr(args, name)})


# -- YAML -------------------------------------------------------------------------------------

def save_config(config: TrainConfig | EvalConfig, output_dir: str | os.PathLike) -> Path:
    """Writes ``config.yaml`` (the full configuration, plain types) into ``output_dir``."""
    path = Path(output_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    os.replace(tmp, path)
    return path


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """Reads a ``config.yaml`` written by ``save_config`` back into a ``TrainConfig``."""
    data = yaml.safe_load(Path(path).read_text())
    data["train"] = DataConfig(**data["train"])
    data["val"] = DataConfig(**data["val"]) if data.get("val") else None
    return TrainConfig(**data)
