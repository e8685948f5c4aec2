"""The served runtime follows a published checkpoint, end to end through a real server.

Its own server (publishing a fine-tuned checkpoint with random adapters would spoil the shared
one). A checkpoint whose adapters are non-zero is published into ``model/medsegx.pth``; the next
request must run the new weights (eager while the OpenVINO graphs of the new weights export in
the background), and once ``/info`` reports the runtime ready, a request that misses the
embedding cache runs the new graphs. Both must equal what eager PyTorch gives for the new
weights in this process (same preparation, same box), and differ from the embedded model's.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegx.metrics import dice

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "medsegx"
LIVER = 1
EXPORT_DEADLINE_S = 900  # the first export of the lite graphs on a loaded 2-core machine


@pytest.fixture(scope="module")
def own_server(sample_data, server_launcher, tmp_path_factory):
    generator = server_launcher.serve(tmp_path_factory.mktemp("runtime-server"), sample_data["datastore"])
    yield next(generator)
    generator.close()


def fine_tuned_lite(seed: int = 3):
    """The lite model with non-zero Up layers and context tables: the context now changes the encoder."""
    from medsegx.build import build_model

    model = build_model("lite")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name or "modal_embed" in name or "organ_embed" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def expected(model, sample_data, roi: list[int]) -> tuple[np.ndarray, list[float]]:
    """Eager PyTorch on the slice as the app prepares it: (label (X, Y, Z) bool, predicted IoUs)."""
    from lib.frames import mask_zhw_to_xyz, volume_to_zhw
    from lib.infers.prompt import parse_prompt
    from medsegx.predictor import Predictor
    from medsegx.taxonomy import resolve
    from medsegx.transforms import prepare_volume

    array = np.asarray(nib.load(sample_data["images"]["ct_phantom"]).dataobj, dtype=np.float32)
    context = resolve("liver", "CT")
    prepared = prepare_volume(volume_to_zhw(array), "CT", context, channels=1)
    prompt = parse_prompt({"roi": roi}, array.shape)
    prediction = Predictor(model, cache_size=0, runtime="eager").predict(prepared[prompt.slice_index],
                                                                          prompt.box_xyxy, context)
    mask = np.zeros(prepared.shape, dtype=bool)
    mask[prompt.slice_index] = prediction.mask
    return mask_zhw_to_xyz(mask), [float(v) for v in prediction.iou]


def liver_roi(sample_data, offset: int) -> list[int]:
    label = np.asarray(nib.load(sample_data["labels"]["ct_phantom"]).dataobj) == LIVER
    x, y, z = np.nonzero(label)
    k = int((z.min() + z.max()) // 2) + offset
    return [int(x.min()), int(x.max()), int(y.min()), int(y.max()), k, k]


def infer(client, roi: list[int]) -> tuple[np.ndarray, dict]:
    result_file, result = client.infer(MODEL, "ct_phantom", {"label": "liver", "roi": roi, "modality": "CT"})
    return np.asarray(nib.load(result_file).dataobj) > 0, result


def runtime_info(client) -> dict:
    return client.info()["models"][MODEL]["runtime"]


def test_published_fine_tuned_checkpoint_runs_on_the_next_request_and_on_the_new_graphs(own_server, sample_data):
    from medsegx.build import build_model
    from medsegx.checkpoint import save_checkpoint

    client = own_server.client()
    first_roi, second_roi = liver_roi(sample_data, 0), liver_roi(sample_data, 1)
    embedded_mask, embedded_iou = expected(build_model("lite"), sample_data, first_roi)
    model = fine_tuned_lite()
    tuned_first = expected(model, sample_data, first_roi)
    tuned_second = expected(model, sample_data, second_roi)
    assert max(abs(a - b) for a, b in zip(tuned_first[1], embedded_iou)) > 0.01  # the adapters matter

    save_checkpoint(model, own_server.app_dir / "model" / "medsegx.pth", metadata={"model_version": "tuned-1"})
    mask, result = infer(client, first_roi)
    assert result["model_version"] == "tuned-1" and result["latencies"]["cache_hit"] is False
    assert dice(mask, tuned_first[0]) >= 0.99
    assert result["iou_all"] == pytest.approx(tuned_first[1], abs=2e-3)

    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while runtime_info(client)["runtime"] != "openvino":
        assert time.monotonic() < deadline, f"no OpenVINO graphs for the new weights: {runtime_info(client)}"
        time.sleep(2)
    mask, result = infer(client, second_roi)  # another slice: encoded by the new graphs
    assert result["latencies"]["model"]["runtime"] == "openvino" and result["latencies"]["cache_hit"] is False
    assert dice(mask, tuned_second[0]) >= 0.99
    assert result["iou_all"] == pytest.approx(tuned_second[1], abs=2e-3)
