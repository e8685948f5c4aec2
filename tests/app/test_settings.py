"""``--conf`` parsing: one frozen AppSettings, one-line errors naming the key."""

import dataclasses

import pytest
from lib.settings import AppConfigError, AppSettings


def test_defaults(tmp_path):
    settings = AppSettings.from_conf({}, tmp_path)
    tmp_path = tmp_path.resolve()
    assert settings.backbone == "lite"
    assert settings.device in ("cpu", "cuda")
    assert settings.cache_size == 64
    assert settings.checkpoint_paths == [tmp_path / "model" / "pretrained.pth", tmp_path / "model" / "medsegx.pth"]
    assert settings.tracking == "mlflow"
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve()}/model/mlflow.db"  # never MLflow's file store
    assert settings.max_voxels == 512 * 512 * 2000 and settings.max_upload_mb == 2048  # a long whole-body CT fits
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.backbone = "vit_b"


def test_labels_from_conf_or_a_file(tmp_path):
    from lib.labels import DEFAULT_LABELS

    assert AppSettings.from_conf({}, tmp_path).labels == DEFAULT_LABELS
    assert AppSettings.from_conf({"labels": "liver, spleen,liver"}, tmp_path).labels == ("liver", "spleen")
    listed = tmp_path / "labels.json"
    listed.write_text('["hippocampus", "amygdala"]')
    assert AppSettings.from_conf({"labels": str(listed)}, tmp_path).labels == ("hippocampus", "amygdala")
    lines = tmp_path / "labels.txt"
    lines.write_text("thalamus\n\nputamen\n")
    settings = AppSettings.from_conf({"labels": str(lines), "default_label": "brain"}, tmp_path)
    assert settings.labels == ("thalamus", "putamen") and settings.default_label == "brain"


def test_input_limits_from_conf(tmp_path):
    settings = AppSettings.from_conf({"max_voxels": "1000", "max_upload_mb": "1"}, tmp_path)
    assert (settings.max_voxels, settings.max_upload_mb) == (1000, 1)
    assert settings.summary()["max_voxels"] == 1000


def test_configured_checkpoint_takes_the_pretrained_slot(tmp_path):
    checkpoint = tmp_path / "mine.pth"
    checkpoint.write_bytes(b"")
    settings = AppSettings.from_conf({"medsegx_checkpoint": str(checkpoint), "cache_size": "3", "device": "cpu"}, tmp_path)
    assert settings.checkpoint_paths == [checkpoint, tmp_path / "model" / "medsegx.pth"]
    assert settings.cache_size == 3 and settings.device == "cpu"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"backbone": "vit_x"}, "--conf backbone 'vit_x' is not one of lite, vit_b, vit_l, vit_h"),
        ({"backbone": "vit_b"}, "needs --conf sam_checkpoint"),
        ({"medsegx_checkpoint": "/nowhere/medsegx.pth"}, "--conf medsegx_checkpoint: file not found: /nowhere/medsegx.pth"),
        ({"backbone": "vit_b", "sam_checkpoint": "/nowhere/sam.pth"}, "--conf sam_checkpoint: file not found: /nowhere/sam.pth"),
        ({"cache_size": "-1"}, "--conf cache_size '-1' is not a non-negative integer"),
        ({"cache_size": "many"}, "--conf cache_size 'many'"),
        ({"device": "tpu"}, "--conf device 'tpu' is not cpu, cuda, cuda:N or mps"),
        ({"tracking": "wandb"}, "--conf tracking 'wandb' is not mlflow or none"),
        ({"tracking_uri": "file:///tmp/mlruns"}, "MLflow 3 refuses the file store"),
        ({"labels": "/nowhere/labels.json"}, "--conf labels: file not found: /nowhere/labels.json"),
        ({"labels": " , "}, "names no structure"),
        ({"max_voxels": "0"}, "--conf max_voxels 0 is not a positive integer"),
        ({"max_upload_mb": "1.5"}, "--conf max_upload_mb '1.5' is not a non-negative integer"),
    ],
)
def test_bad_conf_is_one_line_naming_the_key(tmp_path, conf, message):
    with pytest.raises(AppConfigError) as info:
        AppSettings.from_conf(conf, tmp_path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
