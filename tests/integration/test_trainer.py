"""The offline trainer end to end on a tiny synthetic MedSegDB, on CPU with the tiny random ViT.

Synthetic trees are written in both layouts at 256 x 256 (the model's input size). Runs are
kept to a few optimizer steps of 1-2 images so the whole file stays within a few minutes on
2 cores; the 2-process DDP run goes through ``torchrun`` (gloo).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from medsegx.build import build_model
from medsegx.checkpoint import read_file
from medsegx.data import MedSegDBDataset, scan_id_layout, write_synthetic_medsegdb

from medsegx_training import evaluate as evaluate_cli
from medsegx_training import finetune, pretrain
from medsegx_training.config import (
    ConfigError,
    TrainConfig,
    build_train_parser,
    load_train_config,
    train_config_from_args,
)
from medsegx_training.loaders import eval_loader
from medsegx_training.distributed import DistEnv
from medsegx_training.engine import LRSchedule, evaluate
from medsegx_training.reporting import read_steps
from medsegx_training.trainer import run_training

# Parameters and gradients of the DDP comparison: float32 sums in another order. The gradient's
# rounding grows with its size (a fresh clone on 2026-12-06 differed by 1.8e-7 on an element of
# 0.048, 4e-6 relative), so it has a relative part too; a wrong average is off by a factor.
GRAD_ATOL = 1e-7
GRAD_RTOL = 1e-5
PARAM_ATOL = 1e-6
# AdamW's first update is lr * g / (|g| + 1e-8): for |g| near eps it amplifies rounding
# noise, so the parameter check covers the elements whose gradient is well above eps.
WELL_CONDITIONED_GRAD = 1e-5


def _train_args(data_root, output_dir, *extra) -> list[str]:
    return ["--data-root", str(data_root), "--output-dir", str(output_dir), "--backbone", "tiny_vit",
            "--num-workers", "0", "--no-progress", *map(str, extra)]


def _config(stage: str, args: list[str]) -> TrainConfig:
    return train_config_from_args(stage, build_train_parser(stage).parse_args(args))


def _trained_weights(path) -> dict[str, torch.Tensor]:
    return read_file(path, "checkpoint")["model"]


@pytest.fixture(scope="module")
def medsegdb(tmp_path_factory):
    """ID tree (3 tasks x 2 cases + 1 empty mask) and OOD tree (3 tasks, fine-tune pool 2, inference 2)."""
    root = tmp_path_factory.mktemp("medsegdb")
    id_root = write_synthetic_medsegdb(root / "id", "id", n_cases=2, size=256, seed=0)
    empty_case = id_root / "SynthLiverCT" / "CT_Liver"
    np.save(empty_case / "npy_imgs" / "empty_0000.npy", np.full((256, 256, 3), 40, np.uint8))
    np.save(empty_case / "npy_gts" / "empty_0000.npy", np.zeros((256, 256), np.uint8))
    ood_root = write_synthetic_medsegdb(root / "ood", "ood", n_cases=2, size=256, seed=1)
    return {"id": id_root, "ood": ood_root, "root": root}


# Two epochs of 2 steps (global batch 2 of the 6 images), paper box jitter and adapter dropout on.
PRETRAIN_OPTIONS = ("--epochs", 2, "--global-batch", 2, "--batch-size", 2, "--max-steps-per-epoch", 2,
                    "--warmup-epochs", 1, "--lr", 1e-3)


@pytest.fixture(scope="module")
def pretrained(medsegdb):
    """The uninterrupted reference run."""
    output_dir = medsegdb["root"] / "pretrain"
    config = _config("pretrain", _train_args(medsegdb["id"], output_dir, *PRETRAIN_OPTIONS))
    result = run_training(config)
    return {"config": config, "result": result, "dir": output_dir}


def test_pretrain_loss_falls_and_writes_outputs(pretrained):
    result, output_dir = pretrained["result"], pretrained["dir"]
    assert result.epochs_done == 2 and result.global_step == 4
    first, second = result.history
    assert second["train_loss"] < first["train_loss"] - 0.05, result.history
    for name in ("config.yaml", "last.pth", "medsegx_tiny_vit.pth", "history.csv", "train_steps.csv",
                 "training_curves.png"):
        assert (output_dir / name).is_file(), name
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert load_train_config(output_dir / "config.yaml") == pretrained["config"]
    assert [row["step"] for row in read_steps(output_dir)] == list(range(4))


def test_output_checkpoint_loads_in_the_app(pretrained):
    path = pretrained["result"].final_checkpoint
    data = read_file(path, "checkpoint")  # weights_only=True
    assert set(data) == {"model", "optimizer", "epoch", "metadata"} and data["epoch"] == 2
    meta = data["metadata"]
    assert meta["backbone"] == "tiny_vit" and meta["stage"] == "pretrain"
    assert meta["training_data"]["images"] == 6 and meta["training_data"]["skipped_empty"] == 1
    model = build_model("tiny_vit", checkpoint=path, pretrained=False)
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(value, data["model"][key]), key


def test_resume_reproduces_the_uninterrupted_run(medsegdb, pretrained):
    output_dir = medsegdb["root"] / "interrupted"
    args = _train_args(medsegdb["id"], output_dir, *PRETRAIN_OPTIONS)
    first = run_training(_config("pretrain", args + ["--stop-after-epoch", "1"]))
    assert first.epochs_done == 1 and first.final_checkpoint is None
    assert read_file(output_dir / "last.pth", "checkpoint")["epoch"] == 1

    resumed = run_training(_config("pretrain", args + ["--resume", "auto"]))
    assert resumed.epochs_done == 2
    reference = pretrained["result"].step_losses
    assert [step for step, _, _ in resumed.step_losses] == [2, 3]  # continues with epoch 2
    for (step, loss, lr), (ref_step, ref_loss, ref_lr) in zip(resumed.step_losses, reference[2:]):
        assert step == ref_step and lr == pytest.approx(ref_lr, rel=1e-12)
        assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert [row["step"] for row in read_steps(output_dir)] == list(range(4))
    expected = _trained_weights(pretrained["result"].final_checkpoint)
    for key, value in _trained_weights(resumed.final_checkpoint).items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)


def _grads_by_name(path) -> dict[str, torch.Tensor]:
    """The step's all-reduced gradient, from AdamW's first-step state ``exp_avg = (1 - beta1) * g``."""
    data = read_file(path, "checkpoint")
    names = [name for name, _ in build_model("tiny_vit", pretrained=False).named_trainable_parameters()]
    beta1 = data["optimizer"]["param_groups"][0]["betas"][0]
    return {names[index]: state["exp_avg"] / (1 - beta1) for index, state in data["optimizer"]["state"].items()}


def test_two_process_ddp_matches_one_process(medsegdb, tmp_path):
    """One step, global batch 2: torchrun 2 x 1 image == 1 process x 2 images == 1 process x 1 image x 2 accumulation.

    Deterministic settings: adapter dropout 0 and exact boxes (jitter and dropout draw from
    per-rank RNG streams), constant LR, deterministic kernels. Tolerances: loss 1e-6, the
    all-reduced gradient ``GRAD_ATOL``, parameters ``PARAM_ATOL`` where |g| > 1e-5.
    """
    common = ["--epochs", 1, "--max-steps-per-epoch", 1, "--global-batch", 2, "--adapter-dropout", 0,
              "--box-jitter", 0, "--lr-schedule", "constant", "--deterministic", "--no-tensorboard"]
    ddp_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "medsegx_training.pretrain", *_train_args(medsegdb["id"], ddp_dir, *common, "--batch-size", 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "2 process(es) (cpu): global batch 2 = 1 per process x 2 x 1" in completed.stderr

    single = run_training(_config("pretrain", _train_args(medsegdb["id"], tmp_path / "one", *common,
                                                          "--batch-size", 2)))
    accumulated = run_training(_config("pretrain", _train_args(medsegdb["id"], tmp_path / "accum", *common,
                                                               "--batch-size", 1)))
    ddp_loss = read_steps(ddp_dir)[0]["loss"]
    ddp_weights, ddp_grads = _trained_weights(ddp_dir / "last.pth"), _grads_by_name(ddp_dir / "last.pth")
    torch.manual_seed(0)  # the runs' --seed 0: the same initial weights
    initial = build_model("tiny_vit", pretrained=False).trainable_state_dict()
    for other in (single, accumulated):
        assert ddp_loss == pytest.approx(other.step_losses[0][1], abs=1e-6)
        grads = _grads_by_name(other.output_dir / "last.pth")
        assert grads.keys() == ddp_grads.keys()
        weights = _trained_weights(other.output_dir / "last.pth")
        moved = 0
        for name, grad in grads.items():
            torch.testing.assert_close(ddp_grads[name], grad, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
            well_conditioned = grad.abs() > WELL_CONDITIONED_GRAD
            torch.testing.assert_close(ddp_weights[name][well_conditioned], weights[name][well_conditioned],
                                       atol=PARAM_ATOL, rtol=0, msg=name)
            moved += int((weights[name] != initial[name]).sum())
        assert moved > 0.9 * sum(grad.numel() for grad in grads.values())  # the step did update


def test_finetune_from_pretrained_on_an_ood_split(medsegdb, pretrained, tmp_path):
    output_dir = tmp_path / "finetune"
    argv = _train_args(medsegdb["ood"], output_dir, "--percent", 50, "--checkpoint",
                       pretrained["result"].final_checkpoint, "--epochs", 1, "--global-batch", 3, "--batch-size", 1,
                       "--val-root", medsegdb["id"], "--val-layout", "id", "--no-tensorboard")
    config = _config("finetune", argv)
    assert config.lr == 5e-5 and config.train.layout == "ood" and config.train.percent == 50
    assert config.accumulation_steps(world_size=1) == 3
    result = run_training(config)
    assert result.global_step == 1 and result.best_checkpoint is not None
    meta = read_file(result.final_checkpoint, "checkpoint")["metadata"]
    assert meta["stage"] == "finetune" and meta["training_data"]["images"] == 3  # 1 case per task at 50 % of 2
    assert meta["training_data"]["percent"] == 50
    assert 0.0 <= result.history[0]["val_dice_oracle"] <= 1.0
    assert result.history[0]["val_dice_by_iou"] <= result.history[0]["val_dice_oracle"] + 1e-12
    build_model("tiny_vit", checkpoint=result.best_checkpoint, pretrained=False)


class _KnownMasks(torch.nn.Module):
    """Stands in for MedSegXModel: fixed logits and predicted IoU for every image."""

    def __init__(self, logits: torch.Tensor, iou: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.iou = logits, iou

    def normalize(self, images):
        return images

    def forward(self, images, boxes, context):
        batch = images.shape[0]
        return self.logits.expand(batch, -1, -1, -1), self.iou.expand(batch, -1), None


def test_evaluation_matches_hand_computed_dice(tmp_path):
    case = tmp_path / "HandData" / "CT_Liver"
    (case / "npy_imgs").mkdir(parents=True)
    (case / "npy_gts").mkdir()
    gt = np.zeros((256, 256), np.uint8)
    gt[100:120, 100:120] = 1  # 400 px
    np.save(case / "npy_imgs" / "case.npy", np.zeros((256, 256, 3), np.uint8))
    np.save(case / "npy_gts" / "case.npy", gt)
    logits = torch.full((1, 3, 256, 256), -10.0)
    logits[0, 0, 100:120, 110:130] = 10.0  # shifted 10 px: 200 px overlap -> Dice 2*200/(400+400) = 0.5
    logits[0, 1, 100:120, 100:120] = 10.0  # exact -> Dice 1
    logits[0, 2, 100:110, 100:120] = 10.0  # top half -> Dice 2*200/(200+400) = 2/3
    model = _KnownMasks(logits, torch.tensor([[0.9, 0.2, 0.5]]))
    loader = eval_loader(MedSegDBDataset(scan_id_layout(tmp_path)), 1, DistEnv(), num_workers=0)
    (row,) = evaluate(model, loader, DistEnv(), amp=False)
    assert row["mask_oracle"] == 1 and row["dice_oracle"] == 1.0
    assert row["hd95_oracle"] == 0.0 and row["nsd_oracle"] == 1.0
    assert row["mask_by_iou"] == 0 and row["dice_by_iou"] == pytest.approx(0.5)
    assert row["iou_pred_by_iou"] == pytest.approx(0.9)
    assert row["hd95_by_iou"] == pytest.approx(10.0) and 0.0 < row["nsd_by_iou"] < 1.0


def test_evaluate_cli_writes_csv_and_summary(medsegdb, pretrained, tmp_path):
    output_dir = tmp_path / "eval"
    status = evaluate_cli.main(["--checkpoint", str(pretrained["result"].final_checkpoint), "--backbone", "tiny_vit",
                                "--id-root", str(medsegdb["id"]), "--ood-root", str(medsegdb["ood"]),
                                "--output-dir", str(output_dir), "--batch-size", "4", "--num-workers", "0",
                                "--no-progress"])
    assert status == 0
    with (output_dir / "per_image.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 + 6  # ID: 3 tasks x 2 (the empty mask skipped); OOD inference: 3 tasks x 2
    for column in ("dice_oracle", "dice_by_iou", "hd95_oracle", "hd95_by_iou", "nsd_oracle", "nsd_by_iou",
                   "mask_oracle", "mask_by_iou", "split", "task"):
        assert column in rows[0], column
    assert {row["split"] for row in rows} == {"id", "cross_site", "cross_task"}
    assert all(float(row["dice_oracle"]) >= float(row["dice_by_iou"]) for row in rows)
    summary = (output_dir / "summary.md").read_text()
    assert "## Per split" in summary and "## Per task" in summary
    assert "DSC oracle | DSC by IoU" in summary and "NSD@2px oracle" in summary
    assert "| cross_task | CT_StomachCancer | 2 |" in summary and "1 empty masks skipped" in summary
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["checkpoint"].endswith("medsegx_tiny_vit.pth")


def test_lr_schedule_warmup_then_cosine():
    schedule = LRSchedule(base_lr=1e-3, total_steps=100, warmup_steps=10, min_lr=1e-6)
    assert schedule(0) == pytest.approx(1e-4) and schedule(9) == pytest.approx(1e-3)
    assert schedule(55) == pytest.approx((1e-3 + 1e-6) / 2)
    assert schedule(100) == pytest.approx(1e-6)
    assert LRSchedule(base_lr=1e-3, total_steps=100, kind="constant")(50) == 1e-3


def test_global_batch_must_divide(medsegdb, tmp_path):
    config = _config("pretrain", _train_args(medsegdb["id"], tmp_path, "--global-batch", 1024, "--batch-size", 128))
    assert config.accumulation_steps(world_size=8) == 1 and config.accumulation_steps(world_size=1) == 8
    with pytest.raises(ConfigError, match="not divisible by --batch-size 128 x 3"):
        config.accumulation_steps(world_size=3)
    with pytest.raises(SystemExit):
        pretrain.main(_train_args(medsegdb["id"], tmp_path, "--global-batch", 10, "--batch-size", 4))


def test_clear_cli_errors(medsegdb, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--data-root", str(medsegdb["id"]), "--output-dir", str(tmp_path)])  # vit_b, no SAM file
    assert exit_info.value.code == 2 and "--sam-checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(_train_args(medsegdb["ood"], tmp_path))  # no pretrained checkpoint
    assert "--checkpoint" in capsys.readouterr().err

    broken = tmp_path / "broken"
    write_synthetic_medsegdb(broken, "id", n_cases=1)
    next((broken / "SynthLiverCT" / "CT_Liver" / "npy_gts").glob("*.npy")).unlink()
    assert pretrain.main(_train_args(broken, tmp_path / "out", "--global-batch", 1, "--batch-size", 1)) == 2
    assert "has no ground truth of the same name" in capsys.readouterr().err
