"""Which CPU runtime runs the lite model fastest here: eager PyTorch, ONNX Runtime or OpenVINO.

One process, one model (``build_model("lite")``: LiteMedSAM TinyViT + ConMoAE, context as a
graph input), the same inputs; the three runtimes are called in turn inside every repeat, so a
shared machine's load hits them alike. Measured per runtime:

- export: ONNX Runtime = ``torch.onnx.export(dynamo=True)`` (needs ``onnxscript``) to an ``.onnx``
  file + session (the TorchScript exporter, ``dynamo=False``, still runs in torch 2.13 but its
  TinyViT graph fails ONNX Runtime's shape inference: TinyViT's ``len(x)`` freezes the batch);
  OpenVINO = ``openvino.convert_model`` straight from PyTorch + ``compile_model``
  (``medsegx.runtime.OpenVINORuntime``, no disk cache);
- encoder, one image (the graphs take one image: TinyViT fixes the batch at export; a batch of
  2 or 4 images was no faster per image in OpenVINO on 2 cores);
- prompt encoder + mask decoder: one box, and 10 boxes on one embedding (the click path);
- parity with eager: logits relative L2 and the encoder's.

ONNX Runtime is only needed here (``pip install onnxruntime onnx onnxscript``); the app depends on the winner.

Usage::

    python bench/runtimes.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch


def _onnx_runtime(model, folder: str, threads: int):
    """Export both graphs with the TorchScript exporter and open ONNX Runtime sessions."""
    import onnxruntime as ort

    from medsegx.runtime import DecoderGraph, EncoderGraph, _example_inputs

    model = copy.deepcopy(model)  # the exporter may leave the model changed
    encoder_inputs, decoder_inputs = _example_inputs(model)
    encoder_path, decoder_path = os.path.join(folder, "encoder.onnx"), os.path.join(folder, "decoder.onnx")
    with torch.no_grad():
        torch.onnx.export(EncoderGraph(model), encoder_inputs, encoder_path, dynamo=True, external_data=False,
                          input_names=["images", "context"], output_names=["embeddings", "gates"])
        torch.onnx.export(DecoderGraph(model), decoder_inputs, decoder_path, dynamo=True, external_data=False,
                          input_names=["embeddings", "point_coords", "point_labels"], output_names=["logits", "iou"],
                          # one box prompt (2 rows): a dynamic prompt count exports, then fails in a Reshape
                          )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    encoder = ort.InferenceSession(encoder_path, options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(decoder_path, options, providers=["CPUExecutionProvider"])

    class OrtRuntime:
        name = "onnxruntime"

        def encode(self, images, context):
            outputs = [encoder.run(None, {"images": images[i:i + 1].numpy(), "context": context[i:i + 1].numpy()})
                       for i in range(images.shape[0])]  # one image per run, as OpenVINORuntime
            return (torch.from_numpy(np.concatenate([o[0] for o in outputs])),
                    torch.from_numpy(np.concatenate([o[1] for o in outputs])))

        def decode(self, embeddings, boxes, points=None):
            from medsegx.runtime import prompt_rows

            coords, labels = prompt_rows(boxes, points)
            # prompt by prompt: the exported graph keeps the example's prompt count in a Reshape
            outputs = [decoder.run(None, {"embeddings": embeddings[:1].numpy(), "point_coords": coords[i:i + 1],
                                          "point_labels": labels[i:i + 1]}) for i in range(coords.shape[0])]
            return (torch.from_numpy(np.concatenate([o[0] for o in outputs])),
                    torch.from_numpy(np.concatenate([o[1] for o in outputs])))

    return OrtRuntime()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from medsegx.build import build_model
    from medsegx.runtime import EagerRuntime, OpenVINORuntime
    from medsegx.taxonomy import resolve
    from medsegx.transforms import prepare_intensity, to_model_input

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from predictor import BOX, phantom_hu  # the CT phantom of bench/predictor.py

    load_before = os.getloadavg()
    model = build_model("lite")
    context = resolve("liver", "CT")
    image = prepare_intensity(phantom_hu()[0], "CT", context)
    images, info = to_model_input(image, model.normalize, "cpu")
    context1 = torch.tensor([context.indices])
    box = torch.tensor([[v * 256 / 512 for v in BOX]], dtype=torch.float32)
    boxes10 = box.repeat(10, 1) + torch.linspace(-8, 8, 10)[:, None] * torch.tensor([[-1.0, -1.0, 1.0, 1.0]])

    runtimes = {"eager": (EagerRuntime(model), 0.0)}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        try:
            runtimes["onnxruntime"] = (_onnx_runtime(model, folder, args.threads), time.perf_counter() - start)
        except Exception as err:  # report and go on with the others
            print(f"onnxruntime: export failed: {type(err).__name__}: {err}")
        start = time.perf_counter()
        runtimes["openvino"] = (OpenVINORuntime(model, num_threads=args.threads), time.perf_counter() - start)

        rows: dict[str, dict[str, list[float]]] = {name: {} for name in runtimes}
        parity: dict[str, tuple[float, float]] = {}
        with torch.inference_mode():
            reference_embeddings, _ = model.encode(images, context1)
            reference_logits, _ = model.decode(reference_embeddings, box)
            for name, (runtime, _) in runtimes.items():
                embeddings, _ = runtime.encode(images, context1)  # warm-up + parity
                logits, _ = runtime.decode(embeddings, box)
                runtime.decode(embeddings.expand(10, -1, -1, -1), boxes10)
                parity[name] = (_rel_l2(embeddings, reference_embeddings), _rel_l2(logits, reference_logits))
            for _ in range(args.repeats):
                for name, (runtime, _) in runtimes.items():
                    times = rows[name]
                    times.setdefault("encode1", []).append(_timed(lambda: runtime.encode(images, context1)))
                    times.setdefault("decode1", []).append(
                        _timed(lambda: runtime.decode(reference_embeddings, box)))
                    times.setdefault("decode10", []).append(
                        _timed(lambda: runtime.decode(reference_embeddings.expand(10, -1, -1, -1), boxes10)))
    load_after = os.getloadavg()

    eager = rows["eager"]
    print(f"lite model, CPU, {args.threads} threads, {os.cpu_count()} cores visible; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.2f}' for v in load_before)} before, {'/'.join(f'{v:.2f}' for v in load_after)} after; "
          f"medians of {args.repeats} alternating repeats, ratio = runtime / eager in the same repeat.")
    print()
    print("| runtime | export (s) | encoder (ms) | decoder, 1 box (ms) | decoder, 10 boxes (ms) "
          "| embeddings rel. L2 | logits rel. L2 |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, export_s) in runtimes.items():
        cells = []
        for column in ("encode1", "decode1", "decode10"):
            ratio = statistics.median(t / e for t, e in zip(rows[name][column], eager[column]))
            cells.append(f"{statistics.median(rows[name][column]):.0f} ({ratio:.2f}x)")
        print(f"| {name} | {export_s:.1f} | {' | '.join(cells)} | {parity[name][0]:.1e} | {parity[name][1]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
