"""medsegx.runtime: OpenVINO graphs match eager, follow the weights, and fall back to eager.

The lite model is exported once per module (tens of seconds on 2 cores) into a temporary
cache; the weight-following tests use the tiny random ``tiny_lite`` backbone (seconds).
"""

from __future__ import annotations

import copy
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegx import runtime as runtime_module
from medsegx.build import build_model
from medsegx.metrics import dice
from medsegx.predictor import Predictor
from medsegx.propagation import predict_3d
from medsegx.runtime import ServingRuntime, adapters_inert, prompt_rows, weights_stamp
from medsegx.taxonomy import resolve
from medsegx.transforms import prepare_volume

pytest.importorskip("openvino", reason="the optimised runtime (openvino) is not installed")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fine_tuned(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero Up layers and context tables, written in place (as ``load_state_dict`` does)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name or name.endswith("_embed.weight") or ".organ_embed." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def lite_pair(tmp_path_factory):
    """(OpenVINO predictor, eager predictor) on one lite model; the export runs once, here."""
    model = build_model("lite")
    compiled = Predictor(model, cache_size=4, runtime="openvino", background_export=False,
                         runtime_cache_dir=tmp_path_factory.mktemp("runtime-cache"))
    assert compiled.serving.wait_ready(timeout=600), compiled.serving.last_error
    return compiled, Predictor(model, cache_size=0, runtime="eager")


def structure_slices(sample_data, image: str, structures: dict[str, int], modality: str):
    """(prepared volume (Z, H, W), context, label value, middle slice, box) per structure."""
    array = np.asarray(nib.load(sample_data["images"][image]).dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(sample_data["labels"][image]).dataobj)
    for name, value in structures.items():
        context = resolve(name, modality)
        volume = prepare_volume(np.transpose(array, (2, 1, 0)), modality, context, channels=1)
        mask = np.transpose(labels == value, (2, 1, 0))
        depth = np.flatnonzero(mask.any(axis=(1, 2)))
        z = int(depth[len(depth) // 2])
        rows, cols = np.nonzero(mask[z])
        yield volume, context, z, (cols.min(), rows.min(), cols.max(), rows.max()), (int(depth[0]), int(depth[-1]))


def test_openvino_matches_eager_on_the_sample_volumes(lite_pair, sample_data):
    compiled, eager = lite_pair
    cases = [*structure_slices(sample_data, "ct_phantom", {"liver": 1, "kidney_left": 3}, "CT"),
             *structure_slices(sample_data, "mni152_t1", {"white_matter": 2}, "MRI")]
    for volume, context, z, box, _ in cases:
        ours = compiled.predict(volume[z], box, context)
        reference = eager.predict(volume[z], box, context)
        assert ours.runtime == "openvino" and reference.runtime == "eager"
        assert rel_l2(ours.logits, reference.logits) <= 1e-3, context.target
        assert np.allclose(ours.iou, reference.iou, atol=1e-3)
        assert dice(ours.mask, reference.mask) >= 0.99, context.target
        assert np.allclose(ours.expert_gates, reference.expert_gates, atol=1e-5)


def test_static_and_dynamic_decoder_graphs_match_eager(lite_pair, sample_data):
    """A box or one click (two point rows) runs the static-shape decoder copy, box + clicks the dynamic one."""
    compiled, eager = lite_pair
    volume, context, z, box, _ = next(structure_slices(sample_data, "ct_phantom", {"liver": 1}, "CT"))
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    runtime = compiled.serving.current()
    prompts = {"box": (box, None), "one click": (None, [[*centre, 1]]), "box + clicks": (box, [[*centre, 1], [5, 5, 0]])}
    requests = runtime._decode_requests[0]
    dynamic_before = requests.dynamic_compiled  # False until a prompt of other rows needs it (compiled lazily)
    for name, (prompt_box, points) in prompts.items():
        if name == "box + clicks":
            assert requests.dynamic_compiled is dynamic_before  # boxes and one click never compiled it
        rows = prompt_rows(None if prompt_box is None else torch.zeros(1, 4),
                           None if points is None else (torch.zeros(1, len(points), 2), torch.zeros(1, len(points))))
        assert (rows[0].shape[1] == runtime_module.STATIC_PROMPT_ROWS) == (name != "box + clicks")
        ours = compiled.predict(volume[z], prompt_box, context, points=points)
        reference = eager.predict(volume[z], prompt_box, context, points=points)
        assert rel_l2(ours.logits, reference.logits) <= 1e-3, name
        assert dice(ours.mask, reference.mask) >= 0.99, name
    assert requests.dynamic_compiled


def test_openvino_3d_box_and_clicks_match_eager(lite_pair, sample_data):
    compiled, eager = lite_pair
    volume, context, z, box, (z_first, z_last) = next(structure_slices(sample_data, "ct_phantom", {"liver": 1}, "CT"))
    box3d = (*box, max(z_first, z - 2), min(z_last, z + 2))
    ours = predict_3d(compiled, volume, box3d, context, key="ct")
    reference = predict_3d(eager, volume, box3d, context)
    assert ours.slices == reference.slices and ours.middle.runtime == "openvino"
    assert dice(ours.mask, reference.mask) >= 0.99
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1)
    clicked = compiled.predict_clicks(volume[z], [centre], context)  # 10 boxes decoded in one batch
    assert dice(clicked.mask, eager.predict_clicks(volume[z], [centre], context).mask) >= 0.99


def test_cached_embedding_survives_the_runtime(lite_pair, sample_data):
    """OpenVINO may write into its inputs: a cached embedding must come out of a decode unchanged."""
    compiled, _ = lite_pair
    volume, context, z, box, _ = next(structure_slices(sample_data, "ct_phantom", {"spleen": 2}, "CT"))
    compiled.predict(volume[z], box, context, key="spleen-volume", slice_index=z)
    entry = next(reversed(compiled._cache.values()))
    before = entry.embeddings.clone()
    runtime = compiled.serving.current()
    runtime.decode(entry.embeddings, torch.tensor([[10.0, 10.0, 90.0, 90.0]]))
    assert torch.equal(entry.embeddings, before)


def test_half_precision_cache_hits_match_eager(lite_pair, sample_data):
    """Cached embeddings are float16 (half the memory); a cache hit still matches eager float32."""
    compiled, eager = lite_pair
    for volume, context, z, box, _ in [*structure_slices(sample_data, "ct_phantom", {"liver": 1, "aorta": 5}, "CT"),
                                       *structure_slices(sample_data, "mni152_t1", {"grey_matter": 1}, "MRI")]:
        key = ("half", context.target)
        compiled.predict(volume[z], box, context, key=key, slice_index=z)
        hit = compiled.predict(volume[z], box, context, key=key, slice_index=z)
        reference = eager.predict(volume[z], box, context)
        assert hit.cache_hit and compiled._cache[compiled.cache_key(None, key, z, tuple(context.indices))] \
            .embeddings.dtype == torch.float16
        assert rel_l2(hit.logits, reference.logits) <= 1e-3 and dice(hit.mask, reference.mask) >= 0.99, context.target


def test_prompt_rows_follow_the_eager_prompt_layout():
    box = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    clicks = (torch.tensor([[[5.0, 6.0]]]), torch.tensor([[1]]))
    coords, labels = prompt_rows(box, clicks)  # clicks first, then the box corners
    assert coords.tolist() == [[[5, 6], [1, 2], [3, 4]]] and labels.tolist() == [[1, 2, 3]]
    coords, labels = prompt_rows(None, clicks)  # no box: a padding point
    assert labels.tolist() == [[1, -1]] and coords[0, 1].tolist() == [0, 0]


def test_runtime_follows_the_weights(tmp_path):
    """Weights loaded in place (a published checkpoint) are served at once: eager while the new
    graphs export in the background, then the new graphs; both equal eager on the new weights."""
    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    predictor = Predictor(model, cache_size=0, runtime="auto", runtime_cache_dir=tmp_path)
    assert predictor.serving.wait_ready(timeout=300), predictor.serving.last_error
    image = np.random.default_rng(0).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    context = resolve("liver", "CT")
    box = (20, 30, 120, 110)
    before = predictor.predict(image, box, context)
    assert before.runtime == "openvino" and adapters_inert(model)

    stamp = weights_stamp(model)
    new_state = fine_tuned(copy.deepcopy(model)).state_dict()
    model.load_state_dict(new_state)
    assert weights_stamp(model) != stamp and not adapters_inert(model)
    during = predictor.predict(image, box, context)  # the export of the new weights has just started
    assert during.runtime == "eager"
    assert predictor.serving.wait_ready(timeout=300)
    after = predictor.predict(image, box, context)
    reference = Predictor(model, cache_size=0).predict(image, box, context)
    assert after.runtime == "openvino"
    assert rel_l2(after.logits, reference.logits) <= 1e-3 and rel_l2(during.logits, reference.logits) <= 1e-6
    assert rel_l2(before.logits, reference.logits) > 1e-2  # the new weights did change the output
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # one converted set per weight set


def test_missing_runtime_or_failed_export_serves_eager(monkeypatch, caplog):
    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    context = resolve("liver", "CT")

    monkeypatch.setattr(runtime_module, "runtime_available", lambda: "ModuleNotFoundError: No module named 'openvino'")
    with caplog.at_level(logging.INFO, logger="medsegx.runtime"):
        predictor = Predictor(model, runtime="auto")
    assert predictor.serving.mode == "eager" and predictor.predict(image, (5, 5, 50, 50), context).runtime == "eager"
    assert [r.getMessage() for r in caplog.records] == [
        "serving with eager PyTorch: ModuleNotFoundError: No module named 'openvino'"]
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise runtime_module.RuntimeUnavailable("OpenVINO export failed: RuntimeError: unsupported op")

    monkeypatch.setattr(runtime_module, "OpenVINORuntime", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsegx.runtime"):
        serving = ServingRuntime(model, "auto", cache_dir=False, background=False)
        assert serving.current() is serving.eager
        assert serving.current() is serving.eager  # no second attempt for the same weights
        assert not serving.wait_ready(timeout=1)
    assert len(caplog.records) == 1 and "unsupported op" in caplog.records[0].getMessage()


def test_a_click_decoder_that_fails_to_compile_serves_eager(tmp_path, caplog):
    """The dynamic-shape decoder compiles at the first prompt of several points; if that fails,
    such prompts decode with eager PyTorch (one log line), boxes stay on the compiled graphs."""
    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    predictor = Predictor(model, cache_size=2, runtime="openvino", background_export=False,
                          runtime_cache_dir=tmp_path)
    assert predictor.serving.wait_ready(timeout=300), predictor.serving.last_error
    requests = predictor.serving.current()._decode_requests[0]
    assert not requests.dynamic_compiled

    def broken():
        raise RuntimeError("out of memory compiling the graph")

    requests._compile_dynamic = broken
    image = np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    context, box = resolve("liver", "CT"), (20, 15, 90, 80)
    clicks = [[50, 40, 1], [60, 50, 1], [10, 10, 0]]
    reference = Predictor(model, cache_size=0, runtime="eager").predict(image, box, context, points=clicks)
    with caplog.at_level(logging.WARNING, logger="medsegx.runtime"):
        first = predictor.predict(image, box, context, points=clicks)
        second = predictor.predict(image, box, context, points=clicks[:2])
    assert first.runtime == second.runtime == "eager"
    assert rel_l2(first.logits, reference.logits) <= 1e-3 and dice(first.mask, reference.mask) >= 0.99
    assert [r.getMessage() for r in caplog.records] == [
        "OpenVINO dynamic-shape decoder failed to compile: RuntimeError: out of memory compiling the graph; "
        "prompts of several points decode with eager PyTorch"]  # once, not per click
    assert predictor.predict(image, box, context).runtime == "openvino"


def test_eager_when_the_model_is_not_served_as_exported():
    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    serving = ServingRuntime(model, "auto", cache_dir=False, background=False)
    model.set_mc_dropout(True)  # Monte-Carlo dropout (uncertainty scoring) needs the eager dropout
    assert serving.current() is serving.eager
    model.set_mc_dropout(False)
    model.train()
    assert serving.current() is serving.eager
    with pytest.raises(ValueError, match="runtime must be one of"):
        ServingRuntime(model, "tensorrt")


def test_runtime_follows_a_tuned_decoder(tmp_path):
    """A published checkpoint with a tuned decoder (loaded in place, as the model store does) is
    exported with a second decoder graph: its contexts decode with it, the others as before."""
    from medsegx.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny_lite", pretrained=False)
    predictor = Predictor(model, cache_size=4, runtime="auto", runtime_cache_dir=tmp_path / "graphs")
    assert predictor.serving.wait_ready(timeout=300), predictor.serving.last_error
    image = np.random.default_rng(0).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    liver, spleen, box = resolve("liver", "CT"), resolve("spleen", "CT"), (20, 30, 120, 110)
    before = {name: predictor.predict(image, box, c) for name, c in (("liver", liver), ("spleen", spleen))}

    tuned = copy.deepcopy(model)
    tuned.tune_decoder_for([liver.indices])
    with torch.no_grad():
        for param in tuned.tuned_decoder.parameters():
            param.add_(0.02 * torch.randn(param.shape))
    save_checkpoint(tuned, tmp_path / "medsegx.pth")
    load_checkpoint(model, tmp_path / "medsegx.pth")
    predictor.clear_cache()
    assert model.tuned_context_set() == {tuple(liver.indices)}
    assert predictor.serving.wait_ready(timeout=300), predictor.serving.last_error
    eager = Predictor(model, cache_size=0, runtime="eager")
    for name, context in (("liver", liver), ("spleen", spleen)):
        ours, reference = predictor.predict(image, box, context), eager.predict(image, box, context)
        assert ours.runtime == "openvino" and rel_l2(ours.logits, reference.logits) <= 1e-3, name
    assert rel_l2(predictor.predict(image, box, liver).logits, before["liver"].logits) > 1e-2  # tuned
    assert rel_l2(predictor.predict(image, box, spleen).logits, before["spleen"].logits) <= 1e-6  # untouched
    assert (tmp_path / "graphs").is_dir() and any((tmp_path / "graphs").glob("*/decoder_tuned.xml"))
