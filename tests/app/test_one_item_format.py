"""Inference, in-app training and offline training feed the model bit-identical inputs for one slice.

The three paths: ``Predictor.predict`` (the infer task), the train task's ``ToModelInputd``
on a datastore slice, and ``medsegx.data.MedSegDBDataset`` on the same pixels stored as a
MedSegDB case (``medsegx-pretrain`` / ``medsegx-finetune``). A non-square slice exercises the
resize and the padding.
"""

import numpy as np
import pytest
import torch
from lib.trainers.item_transforms import RandJitterBoxd, ToModelInputd

from medsegx.budget import INLOOP_BOX_JITTER_FRACTION
from medsegx.build import build_model
from medsegx.data import MedSegDBDataset, scan_id_layout
from medsegx.items import mask_box
from medsegx.predictor import Predictor
from medsegx.taxonomy import resolve

LIVER_CT = tuple(int(i) for i in resolve("Liver", "CT").indices)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny_vit", pretrained=False).eval()


def _slice(height: int, width: int):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (height, width), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4: height // 2, width // 5: width // 2] = True
    return image, mask


def _inference_input(model, image, mask):
    """What ``Predictor.predict`` hands the encoder, and the box it maps into the 256 frame."""
    seen = []
    encode = model.encode

    def recording_encode(images, context):
        seen.append((images.detach().clone(), context.detach().clone()))
        return encode(images, context)

    model.encode = recording_encode
    try:
        prediction = Predictor(model, cache_size=0).predict(image, mask_box(mask), resolve("Liver", "CT"))
    finally:
        del model.encode
    (images, context), = seen
    return images[0], torch.as_tensor(np.asarray(prediction.box_model, dtype=np.float32)), context[0]


@pytest.mark.parametrize("height, width", [(300, 120), (256, 256), (64, 96)])
def test_inference_in_app_and_offline_items_are_bit_identical(tiny_model, tmp_path, height, width):
    image, mask = _slice(height, width)
    inferred_image, inferred_box, inferred_context = _inference_input(tiny_model, image, mask)

    in_app = ToModelInputd(tiny_model.normalize)({"image": image, "mask": mask, "context": LIVER_CT})

    case = tmp_path / "Synth" / "CT_Liver"
    (case / "npy_imgs").mkdir(parents=True)
    (case / "npy_gts").mkdir()
    np.save(case / "npy_imgs" / "case.npy", np.repeat(image[..., None], 3, axis=-1))
    np.save(case / "npy_gts" / "case.npy", mask.astype(np.uint8))
    offline = MedSegDBDataset(scan_id_layout(tmp_path))[0]

    for item in (in_app, offline):
        assert torch.equal(item["image"], inferred_image)
        assert torch.equal(item["box"], inferred_box)
        assert torch.equal(item["context"], inferred_context.cpu())
    assert torch.equal(in_app["label"], offline["label"])
    assert torch.equal(in_app["valid_hw"], offline["valid_hw"])


def test_the_train_task_jitters_a_small_box_by_a_share_of_its_side():
    """The app's in-loop jitter (``box_jitter_fraction``) keeps a 4 px box exact, where the paper's moves it."""
    sample = {"box": torch.tensor([70.0, 101.0, 73.0, 104.0]), "valid_hw": torch.tensor([256, 256])}
    in_loop = RandJitterBoxd(max_fraction=INLOOP_BOX_JITTER_FRACTION).set_random_state(0)
    paper = RandJitterBoxd().set_random_state(0)
    assert all(torch.equal(in_loop(sample)["box"], sample["box"]) for _ in range(20))
    moved = torch.stack([paper(sample)["box"] - sample["box"] for _ in range(20)])
    assert moved[:, :2].min() < 0 and moved[:, 2:].max() > 0
