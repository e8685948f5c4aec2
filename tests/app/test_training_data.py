"""The train task's data side and publishing policy, without a server (fast).

- ``lib.labelled_slices``: label names (label info > sidecar > app label map), per-structure
  split of a multi-label file, unreadable / empty / mismatched labels skipped with a warning,
  pictures, the volume split and the slice hold-out;
- ``lib.trainers.medsegx.FineTuneMonitor.complete``: what gets published;
- ``lib.activelearning.uncertainty.Uncertainty``: the highest stored score wins.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lib.activelearning.uncertainty import Uncertainty
from lib.labelled_slices import BuildReport, SliceSetBuilder, hold_out_slices, split_volumes
from lib.score_keys import MODEL_KEY, SCORE_KEY, TS_KEY
from lib.trainers.medsegx import FineTuneMonitor
from medsegx.build import build_model
from medsegx.checkpoint import load_checkpoint
from medsegx.taxonomy import resolve

SHAPE = (40, 32, 6)  # (X, Y, Z) as LoadImage returns a NIfTI


def _ct_volume(path):
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[5:35, 4:28, :] = 50
    hu[0, 0, 0] = 700  # bone-like voxel: the intensities say CT
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)


def _label_volume(path, values=(1, 2)):
    label = np.zeros(SHAPE, dtype=np.uint8)
    if 1 in values:
        label[8:20, 6:18, 1:5] = 1  # 12 x 12 px on slices 1..4
    if 2 in values:
        label[22:30, 10:20, 2:4] = 2  # 8 x 10 px on slices 2..3
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)


def _entry(tmp_path, image_id, label_info=None, values=(1, 2)):
    image = tmp_path / f"{image_id}.nii.gz"
    label_dir = tmp_path / "labels" / "final"
    label_dir.mkdir(parents=True, exist_ok=True)
    label = label_dir / f"{image_id}.nii.gz"
    _ct_volume(image)
    _label_volume(label, values)
    return {"image_id": image_id, "image": str(image), "label": str(label), "label_info": label_info or {},
            "image_info": {}}


def test_multi_label_volume_is_split_per_structure_with_label_info_names(tmp_path):
    entry = _entry(tmp_path, "case1", {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]})
    samples, report = SliceSetBuilder().build([entry])

    assert report.structures == ["case1:liver", "case1:spleen"] and report.skipped == []
    by_name = {}
    for sample in samples:
        by_name.setdefault(sample.label_name, []).append(sample)
    assert [s.slice_index for s in by_name["liver"]] == [1, 2, 3, 4]
    assert [s.slice_index for s in by_name["spleen"]] == [2, 3]
    liver = by_name["liver"][0]
    assert liver.context == resolve("liver", "CT").indices  # modality from the intensities
    assert liver.image.shape == liver.mask.shape == (SHAPE[1], SHAPE[0])  # (H, W) = (Y, X)
    assert liver.image.dtype == np.uint8 and liver.mask.sum() == 144
    assert liver.mask[6:18, 8:20].all()  # rows are y, columns are x


def test_names_from_sidecar_then_app_label_map(tmp_path, caplog):
    entry = _entry(tmp_path, "case2")
    (tmp_path / "case2_labels.json").write_text(json.dumps({"organ_a": 1, "modality": "MRI"}))
    builder = SliceSetBuilder(app_labels={"Spleen": 2, "Liver": 1})
    with caplog.at_level(logging.WARNING):
        samples, report = builder.build([entry])
    assert sorted({s.label_name for s in samples}) == ["Spleen", "organ_a"]
    assert {s.context[0] for s in samples} == {resolve("organ_a", "MRI").indices[0]}  # sidecar modality wins
    assert "named from the app's label map: 2=Spleen" in caplog.text


def test_unnamed_value_is_skipped(tmp_path):
    entry = _entry(tmp_path, "case3", {"label_names": {"liver": 1}})
    samples, report = SliceSetBuilder(app_labels={}).build([entry])
    assert {s.label_name for s in samples} == {"liver"}
    assert any("label value 2 has no name" in message for message in report.skipped)


def test_corrupt_empty_and_mismatched_labels_are_skipped_with_a_warning(tmp_path, caplog):
    good = _entry(tmp_path, "good", {"label_names": {"liver": 1, "spleen": 2}})
    corrupt = _entry(tmp_path, "corrupt")
    with open(corrupt["label"], "wb") as handle:
        handle.write(b"not a nifti" * 50)
    empty = _entry(tmp_path, "empty", values=())
    mismatched = _entry(tmp_path, "mismatched")
    nib.save(nib.Nifti1Image(np.ones((10, 10, 2), np.uint8), np.eye(4)), mismatched["label"])
    tiny = _entry(tmp_path, "tiny", {"label_names": {"dot": 1}}, values=())
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), tiny["label"])

    with caplog.at_level(logging.WARNING):
        samples, report = SliceSetBuilder().build([corrupt, empty, mismatched, tiny, good])
    assert report.volumes == ["good"] and {s.volume_id for s in samples} == {"good"}
    skipped = "\n".join(report.skipped)
    assert "corrupt: cannot read label" in skipped
    assert "empty: the label is empty" in skipped
    assert "mismatched: label shape (2, 10, 10)" in skipped
    assert "tiny: dot (value 1) covers fewer than 10 pixels" in skipped
    assert "skipping corrupt: cannot read label" in caplog.text


def test_picture_slices_keep_display_values(tmp_path):
    image = np.zeros((30, 50), np.uint8)  # (rows, cols)
    image[5:25, 10:40] = 200
    label = np.zeros((30, 50), np.uint8)
    label[8:20, 12:30] = 3
    Image.fromarray(image).save(tmp_path / "pic.png")
    (tmp_path / "labels").mkdir()
    Image.fromarray(label).save(tmp_path / "labels" / "pic.png")
    entry = {"image_id": "pic", "image": str(tmp_path / "pic.png"), "label": str(tmp_path / "labels" / "pic.png"),
             "label_info": {"label_names": {"kidney": 3}, "modality": "CT"}, "image_info": {}}
    samples, report = SliceSetBuilder().build([entry])
    assert len(samples) == 1 and report.skipped == []
    sample = samples[0]
    assert sample.image.shape == (30, 50, 3) and sample.image[10, 20, 0] == 200
    assert sample.mask.shape == (30, 50) and sample.mask[8:20, 12:30].all() and sample.mask.sum() == 12 * 18
    assert sample.context[0] == resolve("kidney", "CT").indices[0]


def test_volume_split_and_slice_hold_out(tmp_path):
    entries = [{"image_id": f"v{i}"} for i in range(5)]
    train, val = split_volumes(entries, 0.2, seed=3)
    assert len(val) == 1 and len(train) == 4 and not {e["image_id"] for e in train} & {e["image_id"] for e in val}
    assert split_volumes(entries[:1], 0.2) == (entries[:1], [])
    assert split_volumes(entries, 0.0) == (entries, [])

    samples, _ = SliceSetBuilder().build([_entry(tmp_path, "one", {"label_names": {"liver": 1, "spleen": 2}})])
    # liver on 4 slices, spleen on 2: too few to hold any out, each validates on its training slices
    train_slices, val_slices = hold_out_slices(samples)
    assert [id(s) for s in train_slices] == [id(s) for s in val_slices] == [id(s) for s in samples]
    # with enough slices every 5th is held out: liver's slice 3 of 1..4 (index 2), spleen keeps its 2
    train_slices, val_slices = hold_out_slices(samples, min_slices=3)
    liver = [s for s in samples if s.label_name == "liver"]
    assert [s.slice_index for s in val_slices] == [liver[2].slice_index, *[s.slice_index for s in samples
                                                                          if s.label_name == "spleen"]]
    assert all(s is not liver[2] for s in train_slices) and len(train_slices) == len(samples) - 1


# ----------------------------------------------------------------------------- publishing policy


def _monitor(tmp_path, policy, baseline, best):
    model = build_model("tiny_vit", pretrained=False)
    task = SimpleNamespace(publish_path=tmp_path / "model" / "medsegx.pth", VAL_METRIC_MEAN_DICE="val_mean_dice",
                           _result={}, interactive_yield=lambda request: None)  # no server to yield to
    context = SimpleNamespace(request={"publish": policy, "lr": 1e-4}, network=model, parent_version="served-1",
                              run_id="run", optimizer=None, build_report=BuildReport(volumes=["a"], slices=3))
    monitor = FineTuneMonitor(task, context)
    monitor.baseline = baseline
    monitor.stopper.update(best, 1, model)
    return monitor, task


@pytest.mark.parametrize(("policy", "baseline", "best", "published"), [
    ("improved", 0.80, 0.85, True),
    ("improved", 0.80, 0.75, False),
    ("improved", 0.80, 0.80, False),
    ("always", 0.80, 0.75, True),
    ("improved", None, None, True),  # nothing to validate on: the last epoch is published
])
def test_publish_policy(tmp_path, policy, baseline, best, published):
    monitor, task = _monitor(tmp_path, policy, baseline, best)
    monitor.complete(SimpleNamespace(state=SimpleNamespace(epoch=2)))
    assert task._result["published"] is published
    assert task.publish_path.is_file() is published
    if published:
        metadata = load_checkpoint(build_model("tiny_vit", pretrained=False), task.publish_path)
        assert metadata["parent_model_version"] == "served-1" and metadata["val_dice"] == best
        assert metadata["model_version"] == task._result["model_version"]
    else:
        assert "served model stays" in task._result["reason"]


def test_exception_publishes_nothing(tmp_path):
    monitor, task = _monitor(tmp_path, "always", 0.5, 0.9)
    with pytest.raises(RuntimeError, match="boom"):
        monitor.failed(SimpleNamespace(), RuntimeError("boom"))
    assert task._result["published"] is False and not task.publish_path.exists()


# ----------------------------------------------------------------------------- strategy


class FakeDatastore:
    def __init__(self, infos: dict[str, dict], labelled: set[str]):
        self.infos, self.labelled = infos, labelled

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return [image for image in self.infos if image not in self.labelled]

    def get_image_info(self, image):
        return self.infos[image]


def test_strategy_picks_the_highest_score_of_the_latest_model():
    infos = {
        "a": {SCORE_KEY: 0.2, MODEL_KEY: "v2", TS_KEY: 20},
        "b": {SCORE_KEY: 0.9, MODEL_KEY: "v1", TS_KEY: 10},  # stale: scored by an older model
        "c": {SCORE_KEY: 0.3, MODEL_KEY: "v2", TS_KEY: 21},
        "d": {SCORE_KEY: 0.99, MODEL_KEY: "v2", TS_KEY: 22},  # labelled meanwhile
        "e": {},
    }
    chosen = Uncertainty()({"strategy": "uncertainty"}, FakeDatastore(infos, labelled={"d"}))
    assert chosen == {"id": "c", "score": 0.3, "score_model_version": "v2"}


def test_strategy_without_scores_falls_back_to_the_first_image():
    chosen = Uncertainty()({"strategy": "uncertainty"}, FakeDatastore({"b": {}, "a": {}}, labelled=set()))
    assert chosen == {"id": "a", "score": None, "score_model_version": None}
    assert Uncertainty()({}, FakeDatastore({"a": {}}, labelled={"a"})) is None


def test_best_validating_weights_are_kept(tmp_path):
    task = SimpleNamespace(publish_path=tmp_path / "model" / "medsegx.pth", VAL_METRIC_MEAN_DICE="val_mean_dice",
                           _result={}, interactive_yield=lambda request: None)
    context = SimpleNamespace(request={"publish": "improved", "lr": 1e-4},
                              network=build_model("tiny_vit", pretrained=False), parent_version="served-1",
                              run_id="run", optimizer=None, build_report=BuildReport(volumes=["a"], slices=3),
                              plan=SimpleNamespace(patience=2, first_stop_epoch=1))
    monitor = FineTuneMonitor(task, context)
    monitor.baseline = 0.5
    task.TRAIN_METRIC_MEAN_DICE = "train_mean_dice"
    network = monitor.context.network
    key = "mask_decoder.iou_token.weight"

    stopped = []

    def end_epoch(epoch, val_dice):
        monitor.context.evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"val_mean_dice": val_dice}))
        monitor.end_epoch(SimpleNamespace(state=SimpleNamespace(
            epoch=epoch, max_epochs=5, output=[{"loss": torch.tensor(0.4)}], metrics={"train_mean_dice": 0.7}),
            terminate=lambda: stopped.append(epoch)))

    end_epoch(1, 0.8)
    kept = network.state_dict()[key].clone()
    stopper = monitor.stopper
    assert torch.equal(stopper.best_weights[key], kept) and (monitor.best, stopper.best_epoch) == (0.8, 1)
    with torch.no_grad():
        network.state_dict()[key].add_(1.0)  # the next epochs change the weights but validate worse
    end_epoch(2, 0.7)
    assert torch.equal(stopper.best_weights[key], kept) and (monitor.best, stopper.best_epoch) == (0.8, 1)
    assert stopped == []
    end_epoch(3, float("nan"))  # a non-finite validation is never the best: the second stale epoch
    assert stopped == [3]  # patience 2: the round stops
    monitor.complete(SimpleNamespace(state=SimpleNamespace(epoch=3)))
    assert task._result["published"] and task._result["best_epoch"] == 1
    assert torch.equal(network.state_dict()[key], kept)  # the published weights are epoch 1's
