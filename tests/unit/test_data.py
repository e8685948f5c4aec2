"""medsegx.data: MedSegDB layouts, pairing errors, empty masks, boxes, context; items in the one model-item format."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medsegx import taxonomy
from medsegx.items import PixelNormalize
from medsegx.transforms import to_model_input
from medsegx.data import (
    OOD_PERCENTS,
    TRAIN_BOX_JITTER,
    MedSegDBDataset,
    MedSegDBIDDataset,
    MedSegDBOODDataset,
    MedSegRecord,
    scan_id_layout,
    scan_ood_layout,
    split_task_folder,
    write_synthetic_medsegdb,
)


def tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


def write_case(case_dir: Path, name: str, image: np.ndarray, gt: np.ndarray) -> None:
    (case_dir / "npy_imgs").mkdir(parents=True, exist_ok=True)
    (case_dir / "npy_gts").mkdir(parents=True, exist_ok=True)
    np.save(case_dir / "npy_imgs" / f"{name}.npy", image)
    np.save(case_dir / "npy_gts" / f"{name}.npy", gt)


@pytest.fixture
def id_root(tmp_path: Path) -> Path:
    return write_synthetic_medsegdb(tmp_path / "ID", layout="id", n_cases=3, size=256, seed=0)


@pytest.fixture
def ood_root(tmp_path: Path) -> Path:
    return write_synthetic_medsegdb(tmp_path / "OOD", layout="ood", n_cases=4, size=64, seed=1)


def test_split_task_folder():
    assert split_task_folder("MRI_ProstatePeripheralZone") == ("MRI", "ProstatePeripheralZone")
    assert split_task_folder("CT_Left_Kidney") == ("CT", "Left_Kidney")
    for bad in ("Liver", "_Liver", "CT_"):
        with pytest.raises(ValueError, match=bad):
            split_task_folder(bad)


def test_id_layout_round_trip(id_root: Path):
    records = scan_id_layout(id_root)
    assert len(records) == 9
    assert {record.task_folder for record in records} == {"CT_Liver", "MRI_ProstatePeripheralZone", "US_ThyroidNodule"}
    prostate = [record for record in records if record.target == "ProstatePeripheralZone"]
    assert {record.sequence for record in prostate} == {"T2"}
    assert all(record.shift is None for record in records)
    for record in records:
        assert record.image_path.parent.name == "npy_imgs"
        assert record.gt_path.name == record.image_path.name
        assert record.context == taxonomy.resolve(record.target, record.modality).indices

    dataset = MedSegDBIDDataset(id_root)
    assert len(dataset) == 9 and dataset.skipped_empty == 0
    for index in range(len(dataset)):
        item = dataset[index]
        record = dataset.records[index]
        image = np.load(record.image_path)
        gt = np.load(record.gt_path)
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 256, 256)
        assert item["label"].dtype == torch.float32 and item["label"].shape == (1, 256, 256)
        assert item["box"].dtype == torch.float32 and item["box"].shape == (4,)
        assert item["context"].dtype == torch.long and item["context"].shape == (5,)
        assert item["path"] == str(record.image_path)
        # 256 x 256 input: the pixels normalised exactly as the predictor does, exact box at jitter 0.
        assert torch.equal(item["image"], PixelNormalize()(torch.from_numpy(image).permute(2, 0, 1).float()))
        assert torch.equal(item["label"][0], torch.from_numpy(gt).float())
        assert item["box"].tolist() == tight_box(gt)
        expected = taxonomy.resolve(record.target, record.modality).indices
        assert item["context"].tolist() == list(expected)


def test_id_dataset_filter_and_missing_dataset(id_root: Path):
    assert {record.dataset for record in scan_id_layout(id_root, datasets=["SynthLiverCT"])} == {"SynthLiverCT"}
    with pytest.raises(ValueError, match="NoSuchDataset"):
        scan_id_layout(id_root, datasets=["NoSuchDataset"])


def test_dataloader_collates(id_root: Path):
    batch = next(iter(DataLoader(MedSegDBIDDataset(id_root), batch_size=4)))
    assert batch["image"].shape == (4, 3, 256, 256)
    assert batch["label"].shape == (4, 1, 256, 256)
    assert batch["box"].shape == (4, 4)
    assert batch["context"].shape == (4, 5)
    assert len(batch["path"]) == 4


def test_ood_layout_round_trip(ood_root: Path):
    for percent in OOD_PERCENTS:
        records = scan_ood_layout(ood_root, split="finetune", percent=percent)
        per_task = max(1, round(4 * percent / 100))
        assert len(records) == 3 * per_task
        assert all(f"{percent:03d}_percent" in str(record.image_path) for record in records)
    inference = scan_ood_layout(ood_root, split="inference")
    assert len(inference) == 12
    assert all(record.image_path.parent.parent.name == "inference" for record in inference)
    assert [r.image_path for r in scan_ood_layout(ood_root, percent="inference")] == [
        r.image_path for r in inference
    ]

    records = scan_ood_layout(ood_root, percent=100)
    assert {record.shift for record in records} == {"cross_site", "cross_task"}
    prostate = [record for record in records if record.target == "ProstatePeripheralZone"]
    assert prostate and {record.sequence for record in prostate} == {"T2"}
    assert {record.dataset for record in prostate} == {"SynthSiteProstateMR"}
    for record in records:
        assert record.context == taxonomy.resolve(record.target, record.modality).indices
    # An unseen task gets the free task row from the taxonomy.
    stomach = [record for record in records if record.target == "StomachCancer"]
    assert stomach and stomach[0].shift == "cross_task"
    assert stomach[0].context[4] == taxonomy.resolve("StomachCancer", "CT").task_index

    assert {r.shift for r in scan_ood_layout(ood_root, shift="cross_task")} == {"cross_task"}
    assert {r.task_folder for r in scan_ood_layout(ood_root, task="CT_Liver")} == {"CT_Liver"}
    assert len(scan_ood_layout(ood_root, dataset="SynthStomachCT")) == 4


def test_ood_dataset_resizes_64_to_256(ood_root: Path):
    dataset = MedSegDBOODDataset(ood_root, split="inference", task="CT_Liver")
    assert len(dataset) == 4
    for index in range(len(dataset)):
        item = dataset[index]
        gt = np.load(dataset.records[index].gt_path)
        assert item["image"].shape == (3, 256, 256)
        image = np.load(dataset.records[index].image_path)
        assert torch.equal(item["image"], to_model_input(image, PixelNormalize())[0][0])  # the predictor's input
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
        # Nearest-exact upscaling by 4 repeats every pixel into a 4x4 block.
        expected_mask = np.kron(gt, np.ones((4, 4)))
        assert np.array_equal(item["label"][0].numpy(), expected_mask)
        assert item["box"].tolist() == [4.0 * value for value in tight_box(gt)]


def test_ood_arguments_validated(ood_root: Path):
    with pytest.raises(ValueError, match="split"):
        scan_ood_layout(ood_root, split="test")
    with pytest.raises(ValueError, match="shift"):
        scan_ood_layout(ood_root, shift="cross_time")
    with pytest.raises(ValueError, match="percent"):
        scan_ood_layout(ood_root, percent=0)
    with pytest.raises(ValueError, match="10_percent"):
        scan_ood_layout(ood_root, percent=10)
    with pytest.raises(ValueError, match="no MedSegDB OOD cases"):
        scan_ood_layout(ood_root, task="CT_Spleen")


def test_non_square_image_is_resized_longest_side_and_padded(tmp_path: Path):
    image = np.full((32, 64, 3), 200, dtype=np.uint8)
    gt = np.zeros((32, 64), dtype=np.uint8)
    gt[8:16, 10:30] = 1
    write_case(tmp_path / "Synth" / "CT_Liver", "case", image, gt)
    item = MedSegDBIDDataset(tmp_path)[0]
    assert item["image"].shape == (3, 256, 256)
    assert torch.allclose(item["image"][:, :128], PixelNormalize()(torch.full((3, 1, 1), 200.0)))
    assert torch.all(item["image"][:, 128:] == 0)  # bottom padding, after normalisation
    assert torch.all(item["label"][:, 128:] == 0)
    assert item["box"].tolist() == [40.0, 32.0, 116.0, 60.0]  # tight box x4
    assert tight_box(item["label"][0].numpy()) == [40.0, 32.0, 119.0, 63.0]


def test_unpaired_image_raises_naming_file_and_folder(id_root: Path):
    gt_dir = id_root / "SynthLiverCT" / "CT_Liver" / "npy_gts"
    (gt_dir / "SynthLiverCT_0001.npy").unlink()
    with pytest.raises(ValueError, match="SynthLiverCT_0001.npy") as error:
        scan_id_layout(id_root)
    assert str(gt_dir) in str(error.value)


def test_unpaired_ground_truth_raises(ood_root: Path):
    case_dir = ood_root / "cross_task" / "CT_StomachCancer" / "SynthStomachCT" / "inference"
    np.save(case_dir / "npy_gts" / "orphan.npy", np.ones((64, 64), np.uint8))
    with pytest.raises(ValueError, match="orphan.npy") as error:
        scan_ood_layout(ood_root, split="inference")
    assert str(case_dir / "npy_imgs") in str(error.value)


def test_missing_gt_folder_raises(tmp_path: Path):
    (tmp_path / "Synth" / "CT_Liver" / "npy_imgs").mkdir(parents=True)
    np.save(tmp_path / "Synth" / "CT_Liver" / "npy_imgs" / "a.npy", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="npy_gts"):
        scan_id_layout(tmp_path)


def test_empty_root_raises(tmp_path: Path):
    with pytest.raises(ValueError, match="no MedSegDB ID cases"):
        scan_id_layout(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        scan_id_layout(tmp_path / "missing")


def test_empty_masks_are_skipped_and_counted(id_root: Path, caplog):
    for name in ("SynthLiverCT_0000.npy", "SynthLiverCT_0002.npy"):
        np.save(id_root / "SynthLiverCT" / "CT_Liver" / "npy_gts" / name, np.zeros((256, 256), np.uint8))
    with caplog.at_level(logging.INFO, logger="medsegx.data"):
        dataset = MedSegDBIDDataset(id_root)
    assert dataset.skipped_empty == 2
    assert len(dataset) == 7
    assert all(record.gt_path.name not in ("SynthLiverCT_0000.npy", "SynthLiverCT_0002.npy")
               for record in dataset.records)
    messages = [record.getMessage() for record in caplog.records if "empty" in record.getMessage()]
    assert len(messages) == 1 and "2" in messages[0]

    kept = MedSegDBIDDataset(id_root, skip_empty=False)
    assert kept.skipped_empty == 0 and len(kept) == 9
    empty_item = kept[0]
    assert empty_item["label"].sum() == 0
    assert empty_item["box"].tolist() == [0.0, 0.0, 255.0, 255.0]


@pytest.mark.parametrize("jitter", [0, 1, TRAIN_BOX_JITTER])
def test_box_jitter_bounds(tmp_path: Path, jitter: int):
    image = np.zeros((256, 256, 3), np.uint8)
    centre = np.zeros((256, 256), np.uint8)
    centre[100:140, 90:160] = 1
    corner = np.zeros((256, 256), np.uint8)
    corner[0:10, 250:256] = 1  # touches the top and right borders
    write_case(tmp_path / "Synth" / "CT_Liver", "centre", image, centre)
    write_case(tmp_path / "Synth" / "CT_Liver", "corner", image, corner)
    dataset = MedSegDBIDDataset(tmp_path, jitter=jitter, generator=torch.Generator().manual_seed(0))
    names = [record.image_path.stem for record in dataset.records]
    for name, gt in (("centre", centre), ("corner", corner)):
        exact = torch.tensor(tight_box(gt))
        boxes = torch.stack([dataset[names.index(name)]["box"] for _ in range(300)])
        outward = torch.cat([exact[:2] - boxes[:, :2], boxes[:, 2:] - exact[2:]], dim=1)  # (N, 4)
        assert torch.all(outward >= 0)  # never pushed inwards
        assert torch.all(outward <= max(jitter - 1, 0))  # 0..jitter-1 px
        assert torch.all(boxes >= 0) and torch.all(boxes <= 255)
        if name == "centre":
            if jitter == 0:
                assert torch.all(outward == 0)
            elif jitter == TRAIN_BOX_JITTER:
                # Every side independently reaches both ends of 0..19.
                assert outward.min(dim=0).values.tolist() == [0, 0, 0, 0]
                assert outward.max(dim=0).values.tolist() == [19, 19, 19, 19]
        else:
            assert torch.all(boxes[:, 1] == 0) and torch.all(boxes[:, 2] == 255)


def test_box_jitter_reproducible(id_root: Path):
    def boxes(generator: torch.Generator | None) -> torch.Tensor:
        dataset = MedSegDBIDDataset(id_root, jitter=TRAIN_BOX_JITTER, generator=generator)
        return torch.stack([dataset[index]["box"] for index in range(len(dataset))])

    assert torch.equal(boxes(torch.Generator().manual_seed(7)), boxes(torch.Generator().manual_seed(7)))
    torch.manual_seed(3)
    first = boxes(None)
    torch.manual_seed(3)
    assert torch.equal(first, boxes(None))


def test_invalid_jitter_raises(id_root: Path):
    with pytest.raises(ValueError, match="-1"):
        MedSegDBIDDataset(id_root, jitter=-1)
    with pytest.raises(ValueError, match="2.5"):
        MedSegDBDataset(scan_id_layout(id_root), jitter=2.5)


def test_image_gt_shape_mismatch_raises(tmp_path: Path):
    write_case(tmp_path / "Synth" / "CT_Liver", "bad", np.zeros((32, 32, 3), np.uint8), np.ones((16, 16), np.uint8))
    dataset = MedSegDBIDDataset(tmp_path)
    with pytest.raises(ValueError, match="bad.npy"):
        dataset[0]


def test_records_from_any_source(id_root: Path):
    record = scan_id_layout(id_root)[0]
    assert isinstance(record, MedSegRecord)
    dataset = MedSegDBDataset([record])
    assert len(dataset) == 1 and dataset[0]["path"] == str(record.image_path)
    with pytest.raises(ValueError, match="records"):
        MedSegDBDataset([])


def test_synthetic_writer_is_deterministic(tmp_path: Path):
    first = write_synthetic_medsegdb(tmp_path / "a", layout="id", n_cases=2, size=64, seed=5)
    second = write_synthetic_medsegdb(tmp_path / "b", layout="id", n_cases=2, size=64, seed=5)
    first_files = sorted(path.relative_to(first) for path in first.rglob("*.npy"))
    assert first_files == sorted(path.relative_to(second) for path in second.rglob("*.npy"))
    assert len(first_files) == 3 * 2 * 2
    for relative in first_files:
        assert np.array_equal(np.load(first / relative), np.load(second / relative))
    image = np.load(first / first_files[0])
    assert image.dtype == np.uint8
    for path in first.rglob("npy_gts/*.npy"):
        gt = np.load(path)
        assert gt.dtype == np.uint8 and gt.shape == (64, 64) and set(np.unique(gt)) == {0, 1}
    with pytest.raises(ValueError, match="layout"):
        write_synthetic_medsegdb(tmp_path / "c", layout="csv")
