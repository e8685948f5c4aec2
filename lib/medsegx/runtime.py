"""An optimised CPU runtime (OpenVINO) for the image encoder and the prompt encoder + mask decoder.

``Predictor`` runs the model through a runtime object with two calls, ``encode(images, context)``
and ``decode(embeddings, boxes, points)``, the ``MedSegXModel`` signatures. ``EagerRuntime`` is
the model itself (the GPU path, and the fallback); ``OpenVINORuntime`` runs two exported graphs:

- ``EncoderGraph``: ``images (B, 3, 256, 256)`` normalised + padded, ``context (B, 5)`` int64
  -> ``embeddings (B, g * g, 256)`` in token layout (pixels row-major, channels last),
  ``expert_gates (B, num_blocks, K)``. The ConMoAE adapters, gates and context tables are inside
  the graph; the context is an input. ``OpenVINORuntime.encode`` hands the embedding on as
  ``(B, 256, g, g)`` in ``torch.channels_last`` memory (the same bytes), which the cache keeps.
- ``DecoderGraph``: ``embeddings (1, g * g, 256)`` in token layout (a channels-last cached
  embedding is fed without a transpose), ``point_coords (B, N, 2)`` in the 256 frame,
  ``point_labels (B, N)`` float -> ``logits (B, 3, 256, 256)``, ``iou (B, 3)``. Boxes and clicks
  are one point list, SAM's ONNX layout: a box is two corner rows labelled 2 and 3, clicks are
  labelled 1 (foreground) / 0 (background), and a prompt without a box gets one padding row
  labelled -1 -- exactly the rows the eager prompt encoder builds, so the outputs match it.
  SAM's mask decoder runs in ``medsegx.modeling.factored_decoder``'s order (the same result
  with ~0.6x the multiply-adds, no image-sized transposes).

OpenVINO was chosen over ONNX Runtime by ``bench/runtimes.py`` on the 2-core CPU this project
targets (ARCHITECTURE.md, "Runtime"). The graphs are converted straight from PyTorch
(``openvino.convert_model``), compiled with the latency hint on ``torch.get_num_threads()``
threads, and, given a ``cache_dir``, saved as IR under a hash of the weights, so a restart with
the same weights skips the conversion. The weights are constants of the graphs: new weights
(a published fine-tuned checkpoint) mean a new export (``Predictor`` does it off the request
path and runs eager meanwhile).

OpenVINO may hand back (and write into) buffers it owns: every output is copied before it
leaves this module, and inputs are passed as fresh arrays, so a cached embedding is never
aliased by the runtime.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medsegx.modeling.factored_decoder import factorable, factored_predict_masks

logger = logging.getLogger(__name__)

__all__ = [
    "DecoderGraph",
    "EagerRuntime",
    "EncoderGraph",
    "OpenVINORuntime",
    "RuntimeUnavailable",
    "ServingRuntime",
    "adapters_inert",
    "default_cache_dir",
    "prepare_ir",
    "weights_stamp",
    "prompt_rows",
    "register_call_hook",
    "runtime_available",
    "weights_digest",
]

_call_hooks: list = []


def register_call_hook(hook) -> None:
    """Call ``hook()`` before every compiled-graph call, as torch calls a module forward pre-hook.

    The compiled graphs run no ``nn.Module``, so a server that stops a request from a module
    hook (``apps/medsegx/lib/concurrency.py``: a client that left, a time cap) registers here
    too; a hook that raises stops the request between two graph calls. Registering twice is a no-op.
    """
    if hook not in _call_hooks:
        _call_hooks.append(hook)


def _before_call() -> None:
    for hook in _call_hooks:
        hook()


#: Point labels of the decoder graph (SAM's ONNX convention).
PAD_LABEL, BACKGROUND_LABEL, FOREGROUND_LABEL, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1.0, 0.0, 1.0, 2.0, 3.0


class RuntimeUnavailable(RuntimeError):
    """The optimised runtime is not installed, or this model cannot be exported."""


class EagerRuntime:
    """The model's own ``encode`` / ``decode`` (PyTorch eager)."""

    name = "eager"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def encode(self, images: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(images, context)

    def decode(self, embeddings, boxes, points=None, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``context``: 5 ints for all prompts; it matters (and is passed on) only with a tuned decoder."""
        embeddings = as_float32(embeddings)
        if context is None or not has_tuned_decoder(self.model):
            return self.model.decode(embeddings, boxes, points)
        return self.model.decode(embeddings, boxes, points,
                                 torch.as_tensor(context, dtype=torch.long, device=embeddings.device))


def as_float32(embeddings: torch.Tensor) -> torch.Tensor:
    """A cached (float16) embedding as float32; one image expanded to ``B`` prompts stays expanded."""
    if embeddings.dtype == torch.float32:
        return embeddings
    if embeddings.shape[0] > 1 and embeddings.stride(0) == 0:
        return embeddings[:1].float().expand_as(embeddings)
    return embeddings.float()


class EncoderGraph(nn.Module):
    """``MedSegXModel.encode`` as a module with tensor inputs only (for export); the embedding in
    token layout ``(B, g * g, C)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, context: torch.Tensor):
        embeddings, gates = self.model.encode(images, context)
        return embeddings.flatten(2).transpose(1, 2), gates


#: The decoder graphs take the embedding at the cache's precision (``Predictor``'s float16) and widen
#: it inside the graph: NumPy's float16 -> float32 conversion took 2 ms of a ~20 ms cache hit, and a
#: threaded PyTorch one right after an OpenVINO call waited ~4 ms for cores its threads still held.
EMBEDDING_DTYPE = np.float16


def image_tokens(embeddings: torch.Tensor) -> np.ndarray:
    """One embedding ``(1, C, g, g)`` (any dtype and memory format) as a new ``EMBEDDING_DTYPE``
    array ``(1, g * g, C)``, the decoder graphs' input.

    A channels-last float16 embedding (what the cache keeps of ``OpenVINORuntime.encode``'s
    output) is already in this order and type: a plain copy, which also keeps the cached
    embedding away from OpenVINO (it may use an input buffer in place). A float32 one is rounded
    to float16 as the cache would.
    """
    tokens = embeddings.detach().cpu().permute(0, 2, 3, 1).numpy()
    tokens = np.array(tokens, dtype=EMBEDDING_DTYPE, order="C", copy=True)
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder of ``MedSegXModel.decode`` on one point list (for export);
    ``tuned``: its tuned decoder instead (``MedSegXModel.tune_decoder_for``).

    Args (forward):
        embeddings: ``(1, g * g, 256)`` one image's embedding in token layout, shared by all ``B`` prompts.
        point_coords: ``(B, N, 2)`` XY in the 256 x 256 input frame.
        point_labels: ``(B, N)`` float: -1 padding, 0 background, 1 foreground, 2 / 3 box corners.

    Returns:
        logits ``(B, 3, 256, 256)`` and predicted IoU ``(B, 3)`` of the model's three outputs.
    """

    def __init__(self, model: nn.Module, tuned: bool = False) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.tuned_decoder if tuned else model.mask_decoder
        self.output_mask_tokens = list(model.output_mask_tokens)
        self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)
        self.grid = tuple(self.image_pe.shape[-2:])
        self.factored = factorable(self.mask_decoder) is None

    def forward(self, embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor):
        prompt = self.prompt_encoder
        batch = point_coords.shape[0]
        height, width = prompt.input_image_size
        coords = point_coords + 0.5  # pixel centres, as SamPromptEncoder does
        coords = torch.stack([coords[..., 0] / width, coords[..., 1] / height], dim=-1)
        encoded = prompt.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1)
        sparse = encoded * (labels != PAD_LABEL).to(encoded.dtype)
        sparse = sparse + prompt.not_a_point_embed.weight * (labels == PAD_LABEL).to(encoded.dtype)
        for index in range(4):  # background, foreground, box top-left, box bottom-right
            sparse = sparse + prompt.point_embeddings[index].weight * (labels == index).to(encoded.dtype)
        if self.factored:
            return factored_predict_masks(self.mask_decoder, embeddings, self.grid, self.image_pe, sparse,
                                          prompt.no_mask_embed.weight.reshape(1, 1, -1), self.output_mask_tokens)
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.grid)
        image = embeddings.transpose(1, 2).reshape(1, -1, *self.grid).expand(batch, -1, -1, -1)
        logits, iou = self.mask_decoder.predict_masks(  # == B: the decoders skip their own repeat
            image_embeddings=image, image_pe=self.image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return logits[:, self.output_mask_tokens], iou[:, self.output_mask_tokens]


def prompt_rows(boxes: torch.Tensor | None, points: tuple[torch.Tensor, torch.Tensor] | None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The decoder graph's point list for ``MedSegXModel.decode``'s ``boxes`` / ``points``.

    The eager prompt encoder embeds the clicks first, then the box's two corners; clicks
    without a box get one padding point. Returns ``(coords (B, N, 2), labels (B, N))`` float32.
    """
    parts_coords, parts_labels = [], []
    if points is not None:
        coords, labels = (np.asarray(t.detach().cpu(), dtype=np.float32) for t in points)
        parts_coords.append(coords)
        parts_labels.append(labels)
        if boxes is None:
            parts_coords.append(np.zeros((coords.shape[0], 1, 2), dtype=np.float32))
            parts_labels.append(np.full((coords.shape[0], 1), PAD_LABEL, dtype=np.float32))
    if boxes is not None:
        corners = np.asarray(boxes.detach().cpu(), dtype=np.float32).reshape(-1, 2, 2)
        parts_coords.append(corners)
        parts_labels.append(np.broadcast_to(np.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], dtype=np.float32),
                                            corners.shape[:2]))
    if not parts_coords:
        raise ValueError("a prompt needs a box or points")
    return (np.ascontiguousarray(np.concatenate(parts_coords, axis=1)),
            np.ascontiguousarray(np.concatenate(parts_labels, axis=1)))


def weights_digest(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, values): the exported graphs' identity."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def runtime_available() -> str | None:
    """``None`` when OpenVINO imports, else why not (one line)."""
    try:
        import openvino  # noqa: F401
    except Exception as err:  # ImportError, or a broken binary wheel
        return f"{type(err).__name__}: {err}"
    return None


def _example_inputs(model: nn.Module) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    size = model.image_size
    images = torch.zeros(1, 3, size, size)
    context = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        embeddings, _ = model.encode(images, context)
    coords = torch.tensor([[[10.0, 20.0], [100.0, 120.0]]])
    labels = torch.tensor([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]])
    return (images, context), (embeddings[:1].flatten(2).transpose(1, 2).contiguous(), coords, labels)


#: Point rows of the decoder graph's static-shape copy: one prompt of one box (two corners) or of one
#: click + padding, what almost every request sends. OpenVINO runs the graph with fixed shapes at
#: 0.76x the time of the dynamic-shape one (29-31 ms vs 38-40 ms, the graphs alone); other prompts
#: (several clicks, box + clicks, batched boxes) run the dynamic graph.
STATIC_PROMPT_ROWS = 2
#: Bumped when the exported graphs change for the same weights (part of the IR cache folder name).
GRAPH_VERSION = 5
#: Niceness of the conversion child process (requests in the server keep priority).
EXPORT_NICE = int(os.environ.get("MEDSEGX_EXPORT_NICE", "5"))
EXPORT_TIMEOUT_S = 3600


def has_tuned_decoder(model: nn.Module) -> bool:
    return getattr(model, "tuned_decoder", None) is not None


def ir_paths(folder: Path, tuned: bool = False) -> tuple[Path, ...]:
    """The IR files: encoder, decoder, and the tuned decoder when the model has one."""
    return (folder / "encoder.xml", folder / "decoder.xml") + ((folder / "decoder_tuned.xml",) if tuned else ())


def convert(model: nn.Module) -> tuple:
    """The graphs as OpenVINO models, converted straight from PyTorch (``openvino.convert_model``):
    encoder, decoder, and the tuned decoder when the model has one (``ir_paths``' order)."""
    import openvino as ov

    encoder_inputs, decoder_inputs = _example_inputs(model)
    size, (pixels, channels) = model.image_size, decoder_inputs[0].shape[1:3]
    decoder_shapes = [("embeddings", [1, pixels, channels]), ("point_coords", [-1, -1, 2]),
                      ("point_labels", [-1, -1])]
    with torch.no_grad():
        graphs = [ov.convert_model(EncoderGraph(model), example_input=encoder_inputs,
                                   input=[("images", [1, 3, size, size]), ("context", [1, 5], ov.Type.i64)])]
        for tuned in (False, True) if has_tuned_decoder(model) else (False,):
            graphs.append(ov.convert_model(DecoderGraph(model, tuned), example_input=decoder_inputs,
                                           input=decoder_shapes))
    return tuple(graphs)


def save_ir(graphs, folder: Path) -> None:
    """Save the graphs of ``convert`` as IR (``.xml`` + ``.bin``), each renamed into place once complete."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    for graph, path in zip(graphs, ir_paths(folder, tuned=len(graphs) > 2)):
        partial = path.with_name(f".{os.getpid()}.{path.name}")
        ov.save_model(graph, partial, compress_to_fp16=False)
        os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(partial, path)


def ir_folder(cache_dir: str | os.PathLike, digest: str) -> Path:
    """Where the IR and compiled blobs of the weights ``digest`` (``weights_digest``) are kept."""
    import openvino as ov

    return Path(cache_dir) / f"{digest}-g{GRAPH_VERSION}-ov{ov.get_version().split('-')[0]}"


def prepare_ir(model: nn.Module, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Convert ``model``'s graphs into the runtime cache now, in this process, for a server to load later.

    The train task calls it before it publishes a checkpoint: the server that loads those
    weights then finds their IR (``ServingRuntime`` keys the cache by ``weights_digest``) and
    only compiles it (~1 s on 2 cores) instead of converting (~20 s, during which eager
    PyTorch serves every request at ~5x the compiled latency). Nothing is done, and ``None``
    returned, when OpenVINO is missing, the model cannot be exported, or the IR is there.
    Conversion errors propagate (the caller decides whether they matter).

    Returns:
        The folder that now holds the IR, or ``None`` when nothing was converted.
    """
    if runtime_available() or exportable(model):
        return None
    model = copy.deepcopy(model).cpu().eval()
    folder = ir_folder(cache_dir if cache_dir is not None else default_cache_dir(), weights_digest(model))
    if all(path.is_file() for path in ir_paths(folder, tuned=has_tuned_decoder(model))):
        return None
    save_ir(convert(model), folder)
    return folder


def model_registered(model: nn.Module) -> bool:
    """A child process can rebuild this architecture from ``model.backbone`` (``medsegx.build``)."""
    from medsegx.build import MODEL_REGISTRY

    return getattr(model, "backbone", None) in MODEL_REGISTRY


def export_in_child(model: nn.Module, folder: Path, num_threads: int) -> None:
    """Convert ``model`` to IR in ``folder`` from a child process (``nice`` +``EXPORT_NICE``).

    Raises:
        RuntimeUnavailable: the child failed (its last error line).
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f".{os.getpid()}.weights.pt"
    torch.save(model.state_dict(), weights)
    command = [sys.executable, "-m", "medsegx.runtime", "--backbone", model.backbone, "--weights", str(weights),
               "--out", str(folder), "--threads", str(num_threads)]
    if EXPORT_NICE > 0 and shutil.which("nice"):
        command = ["nice", "-n", str(EXPORT_NICE), *command]
    env = dict(os.environ, OMP_NUM_THREADS=str(num_threads))
    try:
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as child:
            _CHILDREN.add(child)
            try:
                _, stderr = child.communicate(timeout=EXPORT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                _, stderr = child.communicate()
            finally:
                _CHILDREN.discard(child)
    finally:
        weights.unlink(missing_ok=True)
    if child.returncode != 0:
        lines = [line for line in (stderr or "").splitlines() if line.strip()]
        raise RuntimeUnavailable(f"export process failed ({child.returncode}): {lines[-1] if lines else 'no output'}")


#: Export child processes and export threads running now: ended / joined at interpreter exit, where
#: a thread still inside OpenVINO would otherwise abort the process ("terminate called ...").
_CHILDREN: set[subprocess.Popen] = set()
_EXPORT_THREADS: set[threading.Thread] = set()
_SHUTTING_DOWN = threading.Event()


@atexit.register
def _end_exports() -> None:
    _SHUTTING_DOWN.set()
    for child in list(_CHILDREN):
        child.kill()
    for thread in list(_EXPORT_THREADS):
        thread.join(timeout=60)


def main(argv: list[str] | None = None) -> int:
    """``python -m medsegx.runtime --backbone lite --weights state.pt --out DIR``: save the IR of a model."""
    import argparse
    import warnings

    from medsegx.build import build_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--weights", required=True, help="a state_dict saved with torch.save")
    parser.add_argument("--out", required=True, help="folder for encoder.xml / decoder.xml")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # tracer warnings about TinyViT's shape arithmetic
    torch.set_num_threads(args.threads)
    model = build_model(args.backbone, pretrained=False)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    model.match_state(state)
    model.load_state_dict(state)
    save_ir(convert(model.eval()), Path(args.out))
    return 0


class _DecoderRequests:
    """One decoder graph's infer requests.

    ``static``: the static-shape copy (``STATIC_PROMPT_ROWS``: a box, or one click + padding),
    compiled with the runtime. ``dynamic()``: the dynamic-shape graph (several clicks, box + clicks,
    batched boxes), compiled at its first such prompt: compiled and run it holds ~85 MiB (the
    weights again and its own buffers) that a session of boxes never needs.
    """

    def __init__(self, static, compile_dynamic, keep_alive: list) -> None:
        self.static = static
        self._compile_dynamic, self._keep_alive = compile_dynamic, keep_alive
        self._dynamic = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    def dynamic(self):
        """The dynamic-shape request, compiled on first use.

        Raises:
            RuntimeUnavailable: it failed to compile (logged once; later calls raise at once),
                so the caller serves that prompt with eager PyTorch.
        """
        with self._lock:
            if self._dynamic is None:
                if self._failed is not None:
                    raise RuntimeUnavailable(self._failed)
                start = time.perf_counter()
                try:
                    compiled = self._compile_dynamic()
                    request = compiled.create_infer_request()
                except Exception as err:  # compilation errors come in many types
                    self._failed = f"OpenVINO dynamic-shape decoder failed to compile: {type(err).__name__}: {err}"
                    logger.warning("%s; prompts of several points decode with eager PyTorch", self._failed)
                    raise RuntimeUnavailable(self._failed) from err
                self._keep_alive.append(compiled)  # the runtime's compiled models outlive their requests
                self._dynamic, self._compile_dynamic = request, None
                logger.info("OpenVINO dynamic-shape decoder compiled in %.2f s", time.perf_counter() - start)
            return self._dynamic

    @property
    def dynamic_compiled(self) -> bool:
        return self._dynamic is not None


class OpenVINORuntime:
    """The encoder and decoder graphs compiled by OpenVINO for the CPU.

    Args:
        model: a ``MedSegXModel`` on the CPU; a deep copy is exported, so the caller may keep
            using (and training) ``model`` meanwhile.
        num_threads: inference threads (default ``torch.get_num_threads()``).
        cache_dir: keep the converted IR (``<digest>/encoder.xml`` ...) and OpenVINO's compiled
            blobs here; ``None`` converts every time.
        copy_model: export a deep copy (``False``: ``model`` is a private copy already).
        export_process: with a ``cache_dir``, convert in a child process at lower priority
            (``python -m medsegx.runtime``): tracing and conversion take ~1 GB for the lite
            model, which then never counts against this process's memory.

    Raises:
        RuntimeUnavailable: OpenVINO is missing or the conversion failed (the message says why).
    """

    name = "openvino"

    def __init__(self, model: nn.Module, num_threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, copy_model: bool = True,
                 export_process: bool = True) -> None:
        missing = runtime_available()
        if missing:
            raise RuntimeUnavailable(f"openvino is not importable ({missing})")
        import openvino as ov

        start = time.perf_counter()
        if copy_model:
            model = copy.deepcopy(model).cpu().eval()
        self.digest = weights_digest(model)
        self.num_threads = int(num_threads or torch.get_num_threads())
        self.export_process = export_process and model_registered(model)
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.num_threads,
                  "INFERENCE_PRECISION_HINT": "f32"}
        folder = ir_folder(cache_dir, self.digest) if cache_dir is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(folder / "compiled")})
        #: contexts decoded by the tuned decoder's graphs (``MedSegXModel.tuned_context_set``)
        self.tuned_contexts = model.tuned_context_set() if has_tuned_decoder(model) else set()
        try:
            encoder, *decoders = self._converted(ov, model, folder)
            del model
            self._compiled = [core.compile_model(encoder, "CPU", config)]  # kept alive with their requests
            self._encode_request = self._compiled[0].create_infer_request()
            self._decode_requests = [self._decoder_requests(core, decoder, config) for decoder in decoders]
        except Exception as err:  # conversion / compilation errors come in many types
            raise RuntimeUnavailable(f"OpenVINO export failed: {type(err).__name__}: {err}") from err
        self.export_s = time.perf_counter() - start
        logger.info("OpenVINO runtime ready in %.1f s (%d threads, weights %s)", self.export_s, self.num_threads,
                    self.digest[:8])

    def _decoder_requests(self, core, decoder, config) -> _DecoderRequests:
        import openvino as ov

        static = decoder.clone()
        static.reshape({"point_coords": [1, STATIC_PROMPT_ROWS, 2], "point_labels": [1, STATIC_PROMPT_ROWS]})
        # OpenVINO's fused attention kernels ("snippets") ran the factored decoder's token -> image
        # attention at 2.3 ms instead of ~1.4 ms unfused (4096 keys, 56 query rows): 0.9x the graph time
        config = dict(config, SNIPPETS_MODE="DISABLE")
        graphs = []
        for graph in (decoder, static):
            steps = ov.preprocess.PrePostProcessor(graph)
            steps.input("embeddings").tensor().set_element_type(ov.Type(EMBEDDING_DTYPE))
            graphs.append(steps.build())
        compiled = core.compile_model(graphs[1], "CPU", config)
        self._compiled.append(compiled)
        return _DecoderRequests(compiled.create_infer_request(), lambda: core.compile_model(graphs[0], "CPU", config),
                                self._compiled)

    def _converted(self, ov, model: nn.Module, folder: Path | None) -> tuple:
        if folder is None:
            return convert(model)
        paths = ir_paths(folder, tuned=has_tuned_decoder(model))
        if not all(p.is_file() for p in paths):
            if self.export_process:
                export_in_child(model, folder, self.num_threads)
            else:
                save_ir(convert(model), folder)
        return tuple(ov.Core().read_model(path) for path in paths)

    def encode(self, images: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``MedSegXModel.encode``; returns tensors that own their memory.

        The graph takes one image (TinyViT's ``len(x)`` fixes the batch at export, and on 2
        cores a batch of 2 or 4 is no faster per image: ``bench/runtimes.py``); a batch runs
        image by image.
        """
        images = images.detach().cpu().numpy()
        context = context.detach().cpu().numpy()
        tokens, gates = [], []
        for index in range(images.shape[0]):
            _before_call()
            result = self._encode_request.infer({0: np.array(images[index:index + 1], dtype=np.float32),
                                                 1: np.array(context[index:index + 1], dtype=np.int64)})
            tokens.append(np.array(result[0], dtype=np.float32, copy=True))
            gates.append(np.array(result[1], dtype=np.float32, copy=True))
        tokens = torch.from_numpy(np.concatenate(tokens))  # (B, g * g, C)
        grid = math.isqrt(tokens.shape[1])
        embeddings = tokens.reshape(tokens.shape[0], grid, grid, tokens.shape[2]).permute(0, 3, 1, 2)
        return embeddings, torch.from_numpy(np.concatenate(gates))

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None,
               points: tuple[torch.Tensor, torch.Tensor] | None = None,
               context: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``MedSegXModel.decode``: ``B`` prompts on one embedding (``(1, ...)`` or expanded to
        ``(B, ...)``) run as one batch; distinct embeddings run one graph call each. ``context``
        (5 ints, one for all prompts) picks the tuned decoder's graphs when it was tuned on it."""
        coords, labels = prompt_rows(boxes, points)
        tuned = context is not None and tuple(int(i) for i in context) in self.tuned_contexts
        requests = self._decode_requests[1 if tuned else 0]
        if embeddings.shape[0] > 1 and embeddings.stride(0) != 0:
            rows = [self._decode_one(requests, embeddings[i:i + 1], coords[i:i + 1], labels[i:i + 1])
                    for i in range(embeddings.shape[0])]
            return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        return self._decode_one(requests, embeddings[:1], coords, labels)

    @staticmethod
    def _decode_one(requests: _DecoderRequests, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray):
        image = image_tokens(embedding)
        request = requests.static if coords.shape[:2] == (1, STATIC_PROMPT_ROWS) else requests.dynamic()
        _before_call()
        result = request.infer({0: image, 1: coords, 2: labels})
        return (torch.from_numpy(np.array(result[0], dtype=np.float32, copy=True)),
                torch.from_numpy(np.array(result[1], dtype=np.float32, copy=True)))


def exportable(model: nn.Module) -> str | None:
    """``None`` when ``model`` can run on the optimised runtime, else why not."""
    for attribute in ("encode", "decode", "prompt_encoder", "mask_decoder", "output_mask_tokens", "image_size"):
        if not hasattr(model, attribute):
            return f"{type(model).__name__} is not a MedSegXModel (no {attribute})"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the model is on {device} (the runtime is for the CPU)"
    return None


RUNTIME_MODES = ("auto", "openvino", "eager")


def default_cache_dir() -> Path:
    """``$MEDSEGX_RUNTIME_CACHE``, else ``$XDG_CACHE_HOME/medsegx/runtime`` (``~/.cache/...``): outside any repository."""
    configured = os.environ.get("MEDSEGX_RUNTIME_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medsegx" / "runtime"


def weights_stamp(model: nn.Module, tensors: Sequence[torch.Tensor] | None = None) -> tuple[int, int]:
    """Changes whenever any parameter or buffer is written in place (``load_state_dict``, an optimiser step).

    PyTorch counts in-place writes per tensor (``Tensor._version``); summing them costs well
    under a millisecond, where hashing the weights (``weights_digest``) costs tens of milliseconds.
    ``tensors``: the model's parameters and buffers, listed once by the caller (listing them
    walks every module: ~7 ms for the lite model).
    """
    if tensors is None:
        tensors = [*model.parameters(), *model.buffers()]
    return id(model), sum(int(t._version) for t in tensors)


def adapters_inert(model: nn.Module) -> bool:
    """True when every ConMoAE expert's Up layer is zero: the encoder's output ignores the context.

    ``out = MLP(x) + 0.1 * sum_k g_k * Up_k(...)`` is ``MLP(x)`` whatever the gates are, so the
    embedding of a slice is the same under every label (the embedded model before fine-tuning).
    A model without ConMoAE blocks counts as not inert.
    """
    blocks = getattr(model, "conmoae_blocks", None)
    if not blocks:
        return False
    with torch.no_grad():
        return all(not up.weight.any() and not up.bias.any() for block in blocks for up in block.adapter_up)


class ServingRuntime:
    """Picks, per call, the runtime that serves ``model`` as its weights are *now*.

    The compiled graphs hold the weights they were exported with. ``current()`` compares the
    model's ``weights_stamp`` with the graphs': when the weights changed (a published
    checkpoint loaded in place), it starts a new export -- in a background thread by default,
    from a copy of the model taken at once -- and answers ``EagerRuntime`` until that export
    is ready, so no request ever runs stale weights. Eager also serves when the model is not
    on the CPU, is training or runs Monte-Carlo dropout, when OpenVINO is missing, and after
    an export failed (one log line each, never an exception).

    Args:
        model: the served ``MedSegXModel`` (or any model with ``encode`` / ``decode``).
        mode: ``"auto"`` (OpenVINO on CPU when possible), ``"openvino"`` (the same, but a
            failure is logged as an error) or ``"eager"``.
        cache_dir: where converted graphs are kept (``default_cache_dir()`` when ``None``;
            ``False`` keeps nothing on disk).
        background: export in a thread (the request path never waits); ``False`` exports
            inside the first ``current()`` call.
        keep: converted weight sets kept in ``cache_dir`` (least recently used are removed).
    """

    def __init__(self, model: nn.Module, mode: str = "auto", cache_dir: str | os.PathLike | bool | None = None,
                 background: bool = True, keep: int = 4) -> None:
        if mode not in RUNTIME_MODES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_MODES)}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.cache_dir = None if cache_dir is False else Path(cache_dir) if cache_dir else default_cache_dir()
        self.background = background
        self.keep = keep
        self.eager = EagerRuntime(model)
        self._tensors = [*model.parameters(), *model.buffers()]
        self._structure = getattr(model, "structure_version", 0)
        self.last_export_s: float | None = None
        self.last_error: str | None = None
        self._compiled: OpenVINORuntime | None = None
        self._compiled_stamp: tuple | None = None
        self._failed_stamp: tuple | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Condition()
        self._inert: tuple[tuple | None, bool] = (None, False)
        reason = None if mode == "eager" else runtime_available() or exportable(model)
        if reason is not None:
            log = logger.error if mode == "openvino" else logger.info
            log("serving with eager PyTorch: %s", reason)
            self.mode = "eager"

    def stamp(self) -> tuple[int, int, int]:
        """Changes whenever the served weights do (``weights_stamp``) or a tuned decoder is added or dropped."""
        structure = getattr(self.model, "structure_version", 0)  # a tuned decoder added or dropped
        if structure != self._structure:
            self._tensors, self._structure = [*self.model.parameters(), *self.model.buffers()], structure
        return (*weights_stamp(self.model, self._tensors), structure)

    @property
    def name(self) -> str:
        """``"openvino"`` when the compiled graphs serve the current weights, else ``"eager"``."""
        compiled = self._compiled
        return compiled.name if compiled is not None and self._compiled_stamp == self.stamp() else "eager"

    def adapters_inert(self) -> bool:
        """``adapters_inert(model)``, recomputed only when the weights changed."""
        stamp = self.stamp()
        if self._inert[0] != stamp:
            self._inert = (stamp, adapters_inert(self.model))
        return self._inert[1]

    def current(self) -> EagerRuntime | OpenVINORuntime:
        """The runtime for the next call. Call with the model's users serialised (the predictor's lock)."""
        if self.mode == "eager" or self.model.training or getattr(getattr(self.model, "_context_state", None),
                                                                 "mc_dropout", False):
            return self.eager
        stamp = self.stamp()
        with self._ready:
            if self._compiled is not None and self._compiled_stamp == stamp:
                return self._compiled
            if stamp == self._failed_stamp:
                return self.eager
            if self._thread is not None and self._thread.is_alive():
                return self.eager  # one export at a time; it picks up newer weights when it ends
            if _SHUTTING_DOWN.is_set():
                return self.eager
            if self.background:
                self._thread = threading.Thread(target=self._export_current, name="medsegx-export", daemon=True)
                _EXPORT_THREADS.add(self._thread)
                self._thread.start()
                return self.eager
        self._export_current()
        return self._compiled if self._compiled_stamp == stamp else self.eager

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None,
               points: tuple[torch.Tensor, torch.Tensor] | None = None,
               context: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``current().decode(...)`` and the name of the runtime that ran it: a prompt the compiled
        graphs cannot take (their dynamic-shape decoder failed to compile, logged once) decodes
        with eager PyTorch on the same weights. Call with the model's users serialised."""
        runtime = self.current()
        try:
            logits, iou = runtime.decode(embeddings, boxes, points, context=context)
        except RuntimeUnavailable:
            runtime = self.eager
            logits, iou = runtime.decode(embeddings, boxes, points, context=context)
        return logits, iou, runtime.name

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the compiled graphs serve the current weights (starting the export if needed).

        Returns False on timeout, in eager mode, or when the export failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.current()
        with self._ready:
            while True:
                stamp = self.stamp()
                if self.mode == "eager" or self._failed_stamp == stamp:
                    return False
                if self._compiled is not None and self._compiled_stamp == stamp:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._ready.wait(min(left, 1.0) if left is not None else 1.0)

    def _export_current(self) -> None:
        """Export until the graphs match the model's weights (they may change during an export)."""
        try:
            self._export_rounds()
        finally:
            _EXPORT_THREADS.discard(threading.current_thread())

    def _export_rounds(self) -> None:
        while not _SHUTTING_DOWN.is_set():
            stamp = self.stamp()  # before the copy: a change during it forces another round
            if stamp in (self._compiled_stamp, self._failed_stamp):
                return
            snapshot = copy.deepcopy(self.model).cpu().eval()
            start = time.perf_counter()
            try:
                compiled = OpenVINORuntime(snapshot, num_threads=torch.get_num_threads(), cache_dir=self.cache_dir,
                                           copy_model=False)
            except (RuntimeUnavailable, OSError) as err:
                if _SHUTTING_DOWN.is_set():
                    return
                (logger.error if self.mode == "openvino" else logger.warning)("serving with eager PyTorch: %s", err)
                with self._ready:
                    self._failed_stamp, self.last_error = stamp, str(err)
                    self._ready.notify_all()
                return
            del snapshot
            self._prune_cache(compiled.digest)
            with self._ready:
                self._compiled, self._compiled_stamp = compiled, stamp  # the previous graphs are freed
                self.last_export_s, self.last_error = time.perf_counter() - start, None
                self._ready.notify_all()

    def _prune_cache(self, digest: str) -> None:
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return
        folders = sorted((p for p in self.cache_dir.iterdir() if p.is_dir() and p.name != digest),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for folder in folders[max(0, self.keep - 1):]:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
