"""Box-prompt prediction with an image-embedding cache, slice by slice (3D: ``medsegx.propagation``).

``Predictor`` wraps a ``MedSegXModel`` like segment-anything's ``SamPredictor``: the image
encoder's output for an (image, slice, context) triple is kept in a small LRU cache, so a
second box (or extra points) on the same slice under the same context costs only the
prompt encoder and mask decoder. The context is part of the key because ConMoAE
conditions the *encoder* on it -- except while the adapters are inert (every expert's Up
layer zero, the model before fine-tuning): then the embedding is the same under every label
and a label switch on a cached slice costs the decoder only.

The encoder and decoder run through ``medsegx.runtime.ServingRuntime``: PyTorch eager, or
OpenVINO graphs on the CPU (``runtime="auto"``, what the app uses), re-exported off the
request path whenever the weights change.

Frames (``docs/ARCHITECTURE.md``, ``medsegx.transforms``): boxes and points are given in
original-image pixels, boxes ``(x0, y0, x1, y1)`` as **inclusive** indices (x = column,
y = row); masks come back at the original size; ``Prediction.logits`` are the raw
multimask logits in the 256 x 256 model frame.

Images must already be prepared to uint8 (``medsegx.transforms.prepare_intensity`` /
``prepare_volume``): the predictor never guesses an intensity window.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medsegx.items import mask_box
from medsegx.metrics import dice
from medsegx.modeling.model import regate
from medsegx.runtime import ServingRuntime
from medsegx.taxonomy import TaskContext
from medsegx.transforms import (
    content_key,
    ResizeInfo,
    box_to_model,
    mask_from_model,
    points_to_model,
    to_model_input,
    validate_box,
    validate_box3d,
    validate_points,
)

logger = logging.getLogger(__name__)

__all__ = ["CacheStats", "Prediction", "Predictor", "context_indices"]

#: Embeddings are kept in half precision: 2 MiB instead of 4 per lite cache entry (128 MiB saved at 64
#: entries), and decoded from it on a miss too. Against float32 on 24 sample cases: logits rel. L2
#: <= 3e-5, mask Dice >= 0.9996.
CACHE_DTYPE = torch.float16
SELECT_MODES = ("box_fit", "iou", "oracle")
#: ``select="box_fit"`` (the default for a box): the mask with the highest predicted IoU, unless its
#: bounding box fits the prompt box poorly (box IoU < BOX_FIT_POOR) while another mask's fits it well
#: (>= BOX_FIT_GOOD). ``bench/accuracy.py`` on 132 real slices (thresholds picked on those same slices):
#: exact boxes 0.753 -> 0.766 mean Dice, no structure lower; sides 0-10 % loose (``--loose pct10``)
#: 0.776 -> 0.779 (putamen -0.051); 0-20 px loose (``--loose px20``) 0.435 -> 0.431 (amygdala -0.057).
BOX_FIT_POOR, BOX_FIT_GOOD = 0.6, 0.85
#: How clicks without a box are turned into a mask (``Predictor.predict_clicks``), chosen
#: with ``bench/clicks.py``.
CLICK_METHODS = ("scales", "grow", "refine", "points")
CLICK_METHOD = "scales"
#: ``scales``: candidate box sides, fractions of the image's longer side (geometric, 4 % .. 100 %).
CLICK_SCALES = tuple(float(v) for v in np.geomspace(0.04, 1.0, 10))
#: ``grow``: first box side as a fraction of the image's longer side, growth per round, rounds.
CLICK_START_SIDE = 0.04
CLICK_GROWTH = 0.5
CLICK_GROW_ROUNDS = 12
CLICK_ROUNDS = 2
CLICK_BOX_MARGIN = 3.0
#: Logit offset of the stability score (segment-anything's ``calculate_stability_score``).
STABILITY_OFFSET = 1.0


def context_indices(context: TaskContext | Sequence[int]) -> tuple[int, int, int, int, int]:
    """``TaskContext`` or a 5-sequence -> ``(modality, level1, level2, level3, task)`` ints.

    Raises:
        ValueError: not a ``TaskContext`` or 5 integers.
    """
    if isinstance(context, TaskContext):
        return context.indices
    values = tuple(np.asarray(context).reshape(-1).tolist()) if context is not None else ()
    if len(values) != 5 or not all(float(v).is_integer() for v in values):
        raise ValueError(f"context must be a TaskContext or 5 integers (modality, level1, level2, level3, task), "
                         f"got {context!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what} must be (H, W) or (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (prepare it with medsegx.transforms.prepare_intensity), "
                         f"got dtype {image.dtype}")
    return image


@dataclass(frozen=True)
class CacheStats:
    """Embedding cache counters since construction (or the last ``clear_cache``)."""

    hits: int
    misses: int
    size: int
    capacity: int


@dataclass
class Prediction:
    """One 2D prediction.

    Attributes:
        mask: ``(H, W)`` bool at the original size (chosen output, logit > 0).
        logits: ``(3, 256, 256)`` float32 raw multimask logits in the model frame.
        iou: ``(3,)`` predicted IoU of each output.
        chosen: index of the output used for ``mask``.
        score: predicted IoU of the chosen output.
        stability: stability score of the chosen output, ``|logits > +1| / |logits > -1|``
            in the model frame (segment-anything's; 0 for an empty mask): near 1 for a
            crisp mask, lower when the decoder is unsure.
        expert_gates: ``(num_blocks, K)`` ConMoAE gate weights of the encoder pass.
        box_model: ``(4,)`` the box as the model saw it (XYXY, 256 frame); ``nan`` for a
            points-only prompt.
        cache_hit: the embedding came from the cache (no encoder run).
        encode_ms: resize + normalise + image encoder (0 on a cache hit).
        decode_ms: prompt encoder + mask decoder.
        post_ms: choosing the output and resizing the mask to the original size.
        runtime: what ran the decoder: ``"openvino"`` or ``"eager"``.
    """

    mask: np.ndarray
    logits: np.ndarray
    iou: np.ndarray
    chosen: int
    score: float
    stability: float
    expert_gates: np.ndarray
    box_model: np.ndarray
    cache_hit: bool
    encode_ms: float
    decode_ms: float
    post_ms: float
    runtime: str = "eager"

    @property
    def timings(self) -> dict[str, float | bool]:
        return {"encode_ms": self.encode_ms, "decode_ms": self.decode_ms, "post_ms": self.post_ms,
                "total_ms": self.encode_ms + self.decode_ms + self.post_ms, "cache_hit": self.cache_hit,
                "runtime": self.runtime}


@dataclass
class _Embedding:
    embeddings: torch.Tensor  # (1, 256, g, g); float16 once cached (CACHE_DTYPE), the runtimes take either
    expert_gates: torch.Tensor  # (1, num_blocks, K)
    info: ResizeInfo
    context: tuple[int, ...]  # the context it was encoded under


class Predictor:
    """Box (+ point) prompt predictor with an LRU cache of image embeddings.

    Thread-safe: one lock serialises model use and the cache (the ConMoAE context state in
    the model is shared, so two encoder passes must never interleave).

    Args:
        model: a ``MedSegXModel`` (``medsegx.build.build_model``); put in eval mode.
        cache_size: embeddings kept (lite: 4 MiB each; ViT: 256 KiB each). 0 disables caching.
        device: move the model there; ``None`` keeps the model's device.
        runtime: ``"eager"`` (PyTorch), ``"auto"`` (OpenVINO on CPU, eager elsewhere and until
            the graphs for the current weights are exported) or ``"openvino"``
            (``medsegx.runtime.ServingRuntime``; the app serves with ``"auto"``).
        runtime_cache_dir: where exported graphs are kept (``medsegx.runtime.default_cache_dir``).
        background_export: export off the request path (``False``: the first call waits for it).

    Example:
        >>> predictor = Predictor(build_model("lite"))
        >>> ctx = resolve("liver", "CT")
        >>> image = prepare_intensity(ct_slice_hu, "CT", ctx)
        >>> first = predictor.predict(image, (120, 80, 300, 260), ctx, key="case1")
        >>> second = predictor.predict(image, (310, 200, 380, 270), ctx, key="case1")
        >>> second.cache_hit, second.encode_ms
        (True, 0.0)
    """

    def __init__(self, model: torch.nn.Module, cache_size: int = 8, device: str | torch.device | None = None,
                 runtime: str = "eager", runtime_cache_dir: str | os.PathLike | bool | None = None,
                 background_export: bool = True) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, _Embedding] = OrderedDict()
        self._lock = threading.RLock()
        self._hits = 0
        self._misses = 0
        self._gate_shifts: dict[tuple, torch.Tensor] = {}
        self._gate_shifts_stamp: tuple | None = None
        self.serving = ServingRuntime(self.model, runtime, cache_dir=runtime_cache_dir, background=background_export)

    # -- cache --------------------------------------------------------------------------
    @property
    def cache_stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def cache_key(self, image: np.ndarray, key: Hashable | None, slice_index: int | None,
                  context: tuple[int, ...]) -> tuple:
        """``(key or pixel hash, slice_index, context)``; the context is left out (``None``) while
        the adapters are inert: then the encoder's output is the same under every label."""
        context_part = None if self.serving.adapters_inert() else context
        return (key if key is not None else content_key(image), slice_index, context_part)

    def _gate_shift(self, source: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
        """``model.context_gate_shift`` for one pair of contexts, kept until the weights change
        (1.2 ms of a label switch on a cached slice for the lite model; a lookup after). Lock held."""
        stamp = self.serving.stamp()
        if self._gate_shifts_stamp != stamp:
            self._gate_shifts, self._gate_shifts_stamp = {}, stamp
        shift = self._gate_shifts.get((source, target))
        if shift is None:
            shift = self.model.context_gate_shift(torch.tensor([source], device=self.device),
                                                  torch.tensor([target], device=self.device))
            self._gate_shifts[source, target] = shift
        return shift

    def _embedding(self, image: np.ndarray, key: Hashable | None, slice_index: int | None,
                   context: tuple[int, ...]) -> tuple[_Embedding, bool, float]:
        """Cached encoder output for ``image`` under ``context``; (entry, hit, encode_ms). Lock held."""
        cache_key = self.cache_key(image, key, slice_index, context)
        entry = self._cache.get(cache_key)
        if entry is not None:
            self._cache.move_to_end(cache_key)
            self._hits += 1
            if entry.context != context:  # inert adapters: same embedding, the gates of this context
                gates = regate(entry.expert_gates, self._gate_shift(entry.context, context))
                entry = _Embedding(entry.embeddings, gates, entry.info, context)
            return entry, True, 0.0
        self._misses += 1
        start = time.perf_counter()
        tensor, info = to_model_input(image, self.model.normalize, self.device)
        context_tensor = torch.tensor([context], dtype=torch.long, device=self.device)
        embeddings, gates = self.serving.current().encode(tensor, context_tensor)
        # decoded from the stored precision on a miss too: a request's mask never depends on the cache state
        entry = _Embedding(embeddings.to(CACHE_DTYPE), gates, info, context)
        encode_ms = (time.perf_counter() - start) * 1000.0
        if self.cache_size > 0:
            self._cache[cache_key] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry, False, encode_ms

    @torch.inference_mode()
    def prefetch(self, volume: np.ndarray, slices: Sequence[int], context: TaskContext | Sequence[int],
                 key: Hashable, stop=None) -> int:
        """Encode ``slices`` of ``volume`` into the cache ahead of the boxes that will need them.

        Slices already cached (under ``cache_key``) are skipped; at most ``cache_size`` slices
        are encoded, so what was cached before stays (LRU, oldest first). The lock is taken per
        slice, so a request waits for at most one encoder pass, and ``stop()`` (when given) is
        asked before every slice: a true answer ends the prefetch at once. The cache statistics
        do not count prefetched slices.

        Args:
            volume: prepared ``(Z, H, W)`` uint8, as for ``predict_3d``.
            slices: slice indices in the order to encode them; out-of-range ones are skipped.
            context, key: as ``predict_3d`` (``key`` names the volume).
            stop: optional callable, true when a request is waiting.

        Returns:
            the number of slices encoded.
        """
        volume = check_volume(volume)
        context_tuple = context_indices(context)
        encoded = 0
        for z in slices:
            if encoded >= self.cache_size or (stop is not None and stop()):
                break
            if not 0 <= z < volume.shape[0]:
                continue
            with self._lock:
                if self.cache_key(volume[z], key, z, context_tuple) in self._cache:
                    continue
                image = _as_rgb_uint8(volume[z], what=f"volume slice {z}")
                misses = self._misses
                self._embedding(image, key, z, context_tuple)
                self._misses = misses
                encoded += 1
        return encoded

    # -- 2D -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        image: np.ndarray,
        box: Sequence[float] | np.ndarray | None,
        context: TaskContext | Sequence[int],
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        key: Hashable | None = None,
        select: str | int = "box_fit",
        gt: np.ndarray | None = None,
        slice_index: int | None = None,
    ) -> Prediction:
        """Segment the object in ``box`` (and/or at ``points``) on one prepared 2D image.

        Args:
            image: ``(H, W, 3)`` or ``(H, W)`` uint8 (``prepare_intensity``).
            box: ``(x0, y0, x1, y1)`` inclusive pixel indices; clipped if partly outside.
                ``None`` prompts with ``points`` alone (see ``predict_clicks`` for the
                better way to segment from clicks).
            context: ``TaskContext`` or 5 ints ``(modality, level1, level2, level3, task)``.
            points: optional ``(N, 3)`` rows ``(x, y, label)`` in original pixels, label 1 =
                foreground, 0 = background; added on top of the box.
            key: cache key of the image (e.g. an image id); ``None`` hashes the pixels.
                The cache key is ``(key, slice_index, context)`` (context ``None`` while the
                adapters are inert, ``cache_key``); a caller's key must change
                whenever the pixels do.
            select: ``"box_fit"`` (a box alone: ``box_fit_choice``; else as ``"iou"``),
                ``"iou"`` (highest predicted IoU), ``"oracle"`` (best Dice against ``gt``;
                evaluation only) or a fixed output index 0..2.
            gt: ``(H, W)`` ground truth for ``select="oracle"``.
            slice_index: part of the cache key when ``key`` names a volume.

        Returns:
            ``Prediction``.

        Raises:
            ValueError: bad image / box / points / context / select (the message names it).
        """
        image = _as_rgb_uint8(image)
        height, width = image.shape[:2]
        point_array = validate_points(points, (height, width))
        if box is None and point_array is None:
            raise ValueError("a prompt needs a box or at least one point")
        if box is not None:
            validate_box(box, (height, width))
        select = _check_select(select, gt, (height, width))
        context_tuple = context_indices(context)
        with self._lock:
            entry, hit, encode_ms = self._embedding(image, key, slice_index, context_tuple)
            return self._decode(entry, hit, encode_ms, box, point_array, select, gt)

    @torch.inference_mode()
    def predict_boxes(self, image: np.ndarray, boxes: Sequence[Sequence[float] | np.ndarray],
                      context: TaskContext | Sequence[int], key: Hashable | None = None,
                      slice_index: int | None = None) -> list[Prediction]:
        """Several boxes on one image, decoded as one batch on its (cached) embedding.

        Each mask is the output with the highest predicted IoU (``select="iou"``). The first
        prediction carries the encoder time, the decoder time is shared out evenly.

        Raises:
            ValueError: no box, a bad box, image or context.
        """
        image = _as_rgb_uint8(image)
        if not len(boxes):
            raise ValueError("predict_boxes needs at least one box")
        boxes = [validate_box(box, image.shape[:2]) for box in boxes]
        context_tuple = context_indices(context)
        with self._lock:
            entry, hit, encode_ms = self._embedding(image, key, slice_index, context_tuple)
            if len(boxes) == 1:
                return [self._decode(entry, hit, encode_ms, boxes[0], None, "iou", None)]
            info = entry.info
            start = time.perf_counter()
            box_tensor = torch.from_numpy(np.stack([box_to_model(b, info) for b in boxes])).to(self.device)
            embeddings = entry.embeddings.expand(len(boxes), -1, -1, -1)
            logits, iou, runtime = self.serving.decode(embeddings, box_tensor, context=entry.context)
            decode_ms = (time.perf_counter() - start) * 1000.0 / len(boxes)
        logits, iou = logits.detach().float().cpu().numpy(), iou.detach().float().cpu().numpy()
        gates = entry.expert_gates[0].float().cpu().numpy()
        predictions = []
        for index, box in enumerate(boxes):
            start = time.perf_counter()
            chosen = int(np.argmax(iou[index]))
            mask = mask_from_model(logits[index, chosen], info)
            stability = _stability(logits[index, chosen])
            predictions.append(Prediction(
                mask=mask, logits=logits[index], iou=iou[index], chosen=chosen, score=float(iou[index, chosen]),
                stability=stability, expert_gates=gates, box_model=box_to_model(box, info), cache_hit=hit,
                encode_ms=encode_ms if index == 0 else 0.0, decode_ms=decode_ms,
                post_ms=(time.perf_counter() - start) * 1000.0, runtime=runtime))
        return predictions

    def _decode(self, entry: _Embedding, hit: bool, encode_ms: float, box, point_array, select, gt) -> Prediction:
        info = entry.info
        start = time.perf_counter()
        box_model = box_to_model(box, info) if box is not None else np.full(4, np.nan, dtype=np.float32)
        prompt_points = None
        if point_array is not None:
            coords = torch.from_numpy(points_to_model(point_array[:, :2], info))[None].to(self.device)
            labels = torch.from_numpy(point_array[:, 2].astype(np.int64))[None].to(self.device)
            prompt_points = (coords, labels)
        boxes = torch.from_numpy(box_model)[None].to(self.device) if box is not None else None
        logits, iou, runtime = self.serving.decode(entry.embeddings, boxes, prompt_points, context=entry.context)
        decode_ms = (time.perf_counter() - start) * 1000.0

        # NumPy from here: PyTorch's threaded ops on these small arrays wait for the cores that
        # OpenVINO's threads still hold after a call (``mask_from_model``)
        start = time.perf_counter()
        logits = logits[0].detach().float().cpu().numpy()
        iou_values = iou[0].detach().float().cpu().numpy()
        if select == "oracle":
            masks = mask_from_model(logits, info)
            scores = [dice(m, gt) for m in masks]
            chosen = int(np.argmax(scores))
            mask = masks[chosen]
        else:
            if select == "box_fit" and box is not None and point_array is None:
                chosen = box_fit_choice(logits, iou_values, box_model, info.resized_size, info.scale)
            elif select in ("iou", "box_fit"):
                chosen = int(np.argmax(iou_values))
            else:
                chosen = int(select)
            mask = mask_from_model(logits[chosen], info)
        stability = _stability(logits[chosen])
        post_ms = (time.perf_counter() - start) * 1000.0
        return Prediction(
            mask=mask,
            logits=logits,
            iou=iou_values,
            chosen=chosen,
            score=float(iou_values[chosen]),
            stability=stability,
            expert_gates=entry.expert_gates[0].float().cpu().numpy(),
            box_model=box_model,
            cache_hit=hit,
            encode_ms=encode_ms,
            decode_ms=decode_ms,
            post_ms=post_ms,
            runtime=runtime,
        )

    # -- clicks -------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_clicks(
        self,
        image: np.ndarray,
        points: Sequence[Sequence[float]] | np.ndarray,
        context: TaskContext | Sequence[int],
        key: Hashable | None = None,
        slice_index: int | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        method: str = CLICK_METHOD,
        rounds: int = CLICK_ROUNDS,
        margin: float = CLICK_BOX_MARGIN,
    ) -> Prediction:
        """Segment the object under foreground clicks (optionally background clicks, a box).

        LiteMedSAM was trained with boxes only: from points alone its masks are empty or
        tiny (``bench/clicks.py``: mean Dice 0.00-0.07 for 1-3 clicks, against 0.77 for a
        box). So the clicks choose a box: ``method="scales"`` (default) decodes boxes of
        several sizes centred on the foreground clicks in one batch and keeps the crispest
        mask (predicted IoU x stability) that covers the foreground and not the background
        clicks, then decodes that mask's own box once more. ``"grow"`` starts from a small
        box and grows it on every side the mask touches; ``"refine"`` takes the points-only
        mask's box; ``"points"`` is the points-only mask. With a ``box`` given, box + clicks
        are decoded once. Every candidate reuses one cached embedding: the extra cost is the
        decoder's.

        Args:
            image: ``(H, W, 3)`` or ``(H, W)`` uint8.
            points: ``(N, 3)`` rows ``(x, y, label)``, label 1 foreground / 0 background; at
                least one foreground click.
            context, key, slice_index: as ``predict``.
            box: optional user box; then the clicks refine it.
            method: one of ``CLICK_METHODS``.
            rounds: box-refinement rounds of ``"refine"``.
            margin: px added on every side of the mask's bounding box.

        Returns:
            ``Prediction`` of the last round; ``decode_ms`` / ``post_ms`` summed over rounds.

        Raises:
            ValueError: no foreground click, a point off the image, an unknown method.
        """
        if method not in CLICK_METHODS:
            raise ValueError(f"method must be one of {', '.join(CLICK_METHODS)}, got {method!r}")
        image = _as_rgb_uint8(image)
        height, width = image.shape[:2]
        point_array = validate_points(points, (height, width))
        if point_array is None or not np.any(point_array[:, 2] == 1):
            raise ValueError("clicks need at least one foreground point")
        if box is not None:
            return self.predict(image, box, context, points=point_array, key=key, slice_index=slice_index)
        context_tuple = context_indices(context)
        foreground = point_array[point_array[:, 2] == 1, :2]
        with self._lock:
            entry, hit, encode_ms = self._embedding(image, key, slice_index, context_tuple)
            if method == "scales":
                prediction, decode_ms, post_ms = self._scales_from_clicks(entry, hit, encode_ms, point_array,
                                                                          margin, (height, width))
            elif method == "grow":
                prediction, decode_ms, post_ms = self._grow_from_clicks(entry, hit, encode_ms, foreground,
                                                                        None, margin, (height, width))
            else:
                prediction = self._decode(entry, hit, encode_ms, None, point_array, "iou", None)
                decode_ms, post_ms = prediction.decode_ms, prediction.post_ms
                if method == "refine":
                    for _ in range(rounds):
                        box_xyxy = _click_box(prediction.mask, foreground, margin, (height, width))
                        prediction = self._decode(entry, hit, encode_ms, box_xyxy, point_array, "iou", None)
                        decode_ms += prediction.decode_ms
                        post_ms += prediction.post_ms
        prediction.decode_ms, prediction.post_ms = decode_ms, post_ms
        return prediction

    def _scales_from_clicks(self, entry, hit, encode_ms, point_array, margin, image_size):
        """Boxes of several sizes on the clicks; keep the crispest mask that obeys them. Lock held.

        Candidates are centred on the foreground clicks (each at least as large as their
        bounding box) with sides ``CLICK_SCALES`` x the image's longer side, decoded in one
        batch. Score: predicted IoU x stability, halved for every foreground click the mask
        misses and every background click it covers. The best mask's own bounding box
        (+ ``margin``) is decoded once more and kept when it scores no worse.

        Returns ``(prediction, decode_ms, post_ms)``.
        """
        height, width = image_size
        high = np.array([width - 1.0, height - 1.0, width - 1.0, height - 1.0])
        foreground = point_array[point_array[:, 2] == 1, :2]
        background = point_array[point_array[:, 2] == 0, :2]
        low_xy, high_xy = foreground.min(axis=0), foreground.max(axis=0)
        centre, extent = (low_xy + high_xy) / 2.0, high_xy - low_xy
        boxes = []
        for scale in CLICK_SCALES:
            half = np.maximum(extent + 2 * margin, scale * max(height, width)) / 2.0
            boxes.append(np.clip(np.concatenate([centre - half, centre + half]), 0.0, high))
        start = time.perf_counter()
        info = entry.info
        box_tensor = torch.from_numpy(np.stack([box_to_model(b, info) for b in boxes]))
        embeddings = entry.embeddings.expand(len(boxes), -1, -1, -1)
        logits, iou, _ = self.serving.decode(embeddings, box_tensor.to(self.device), context=entry.context)
        decode_ms = (time.perf_counter() - start) * 1000.0
        start = time.perf_counter()
        best_index, best_score = 0, -1.0
        logits, iou = logits.detach().float().cpu().numpy(), iou.detach().float().cpu().numpy()
        for index in range(len(boxes)):
            chosen = int(np.argmax(iou[index]))
            mask = mask_from_model(logits[index, chosen], info)
            score = (float(iou[index, chosen]) * _stability(logits[index, chosen])
                     * _click_agreement(mask, foreground, background))
            if score > best_score:
                best_index, best_score = index, score
        post_ms = (time.perf_counter() - start) * 1000.0
        prediction = self._decode(entry, hit, encode_ms, boxes[best_index], None, "iou", None)
        decode_ms, post_ms = decode_ms + prediction.decode_ms, post_ms + prediction.post_ms
        mask = component_at(prediction.mask, foreground)
        if mask.any():
            refined = self._decode(entry, hit, encode_ms, _click_box(mask, foreground, margin, image_size),
                                   None, "iou", None)
            decode_ms, post_ms = decode_ms + refined.decode_ms, post_ms + refined.post_ms
            if _click_score(refined, foreground, background) >= _click_score(prediction, foreground, background):
                prediction = refined
        return prediction, decode_ms, post_ms

    def _grow_from_clicks(self, entry, hit, encode_ms, foreground, prompt_points, margin, image_size):
        """A small box on the clicks, grown on every side the mask touches, until it fits. Lock held.

        Returns ``(prediction, decode_ms, post_ms)``, times summed over rounds.
        """
        height, width = image_size
        limit = np.array([0.0, 0.0, width - 1.0, height - 1.0])
        half = 0.5 * max(2.0, CLICK_START_SIDE * max(height, width))
        box = np.array([foreground[:, 0].min() - half, foreground[:, 1].min() - half,
                        foreground[:, 0].max() + half, foreground[:, 1].max() + half])
        box = np.clip(box, limit[:2].tolist() * 2, limit[2:].tolist() * 2)
        decode_ms = post_ms = 0.0
        prediction = None
        for _ in range(CLICK_GROW_ROUNDS):
            prediction = self._decode(entry, hit, encode_ms, box, prompt_points, "iou", None)
            decode_ms += prediction.decode_ms
            post_ms += prediction.post_ms
            mask = component_at(prediction.mask, foreground)
            side = max(box[2] - box[0], box[3] - box[1], 2.0)
            if not mask.any():
                grown = box + np.array([-1, -1, 1, 1]) * CLICK_GROWTH * side
            else:
                fitted = _click_box(mask, foreground, margin, image_size)
                touching = np.abs(box_of(mask) - box) <= 1.0
                touching &= np.abs(box - limit) > 0.5  # the image edge is no reason to grow
                if not touching.any():
                    if np.allclose(fitted, box, atol=1.0):
                        break
                    grown = fitted
                else:
                    grown = np.where(touching, box + np.array([-1, -1, 1, 1]) * CLICK_GROWTH * side, fitted)
            grown = np.clip(grown, limit[:2].tolist() * 2, limit[2:].tolist() * 2)
            if np.allclose(grown, box):
                break
            box = grown
        return prediction, decode_ms, post_ms


def check_volume(volume: np.ndarray) -> np.ndarray:
    """A prepared ``(Z, H, W)`` / ``(Z, H, W, 3)`` uint8 volume, or a ``ValueError`` naming what is wrong."""
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if not (volume.ndim == 3 or (volume.ndim == 4 and volume.shape[-1] == 3)):
        raise ValueError(f"volume must be (Z, H, W) or (Z, H, W, 3), got shape {volume.shape}")
    if volume.dtype != np.uint8:
        raise ValueError(f"volume must be uint8 (prepare it with medsegx.transforms.prepare_volume), "
                         f"got dtype {volume.dtype}")
    return volume


def box_of(mask: np.ndarray) -> np.ndarray:
    """``(x0, y0, x1, y1)`` inclusive bounding box of a non-empty 2D mask as float64 (``items.mask_box``)."""
    return np.asarray(mask_box(mask), dtype=np.float64)


def pixels_at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``mask``'s values under ``(N, 2)`` ``(x, y)`` points, rounded and clipped to the mask."""
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
    return mask[rows, cols]


def _click_agreement(mask: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> float:
    """1, halved for each foreground click outside ``mask`` and each background click inside."""
    misses = int((~pixels_at(mask, foreground)).sum()) + (int(pixels_at(mask, background).sum()) if len(background) else 0)
    return 0.5 ** misses


def _click_score(prediction: Prediction, foreground: np.ndarray, background: np.ndarray) -> float:
    return prediction.score * prediction.stability * _click_agreement(prediction.mask, foreground, background)


def components_hit(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The connected parts of ``mask`` under ``(N, 2)`` ``(x, y)`` points (empty if none is hit)."""
    from scipy import ndimage

    if not len(points) or not mask.any():
        return np.zeros_like(mask)
    components, _ = ndimage.label(mask)
    hit = {int(v) for v in pixels_at(components, points) if v}
    return np.isin(components, list(hit)) if hit else np.zeros_like(mask)


def component_at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The connected parts of ``mask`` under ``points`` (all of it if none is hit)."""
    hit = components_hit(mask, points)
    return hit if hit.any() else mask


def _click_box(mask: np.ndarray, foreground: np.ndarray, margin: float, image_size: tuple[int, int]) -> np.ndarray:
    """Bounding box of ``mask`` and the foreground clicks, pushed out by ``margin``, clipped."""
    height, width = image_size
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    xs = np.concatenate([cols.astype(np.float64), foreground[:, 0]])
    ys = np.concatenate([rows.astype(np.float64), foreground[:, 1]])
    box = np.array([xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin])
    return np.clip(box, 0.0, [width - 1, height - 1, width - 1, height - 1])


def _stability(logits: np.ndarray) -> float:
    """SAM's stability score of one ``(256, 256)`` logit map: pixels above ``+STABILITY_OFFSET``
    over pixels above ``-STABILITY_OFFSET`` (0 when none is)."""
    unsure = np.count_nonzero(logits > -STABILITY_OFFSET)
    return np.count_nonzero(logits > STABILITY_OFFSET) / unsure if unsure else 0.0


def box_fit_choice(logits: np.ndarray, iou: np.ndarray, box_model: np.ndarray, resized_hw: Sequence[int],
                   scale: float) -> int:
    """``select="box_fit"``: the IoU choice, or the mask whose bounding box fits the prompt box when
    the IoU choice's fits poorly and that one's fits well (``BOX_FIT_POOR`` / ``BOX_FIT_GOOD``).

    Fits are box IoUs in the 256 model frame, pixel ``i`` covering ``[i, i + 1)``; the prompt box
    covers ``[x0, x1 + 1)`` original pixels, scaled (``scale``: model pixels per original pixel).
    ``resized_hw``: the valid (unpadded) area of the 256 frame. Also what the train task and
    ``bench/finetune_curve.py`` score (``medsegx.steps.val_step``).
    """
    by_iou = int(np.argmax(iou))
    height, width = (int(v) for v in resized_hw)
    masks = logits[:, :height, :width] > 0
    x0, y0 = float(box_model[0]), float(box_model[1])
    x1, y1 = float(box_model[2]) + scale, float(box_model[3]) + scale
    fits = []
    for mask in masks:
        if not mask.any():
            fits.append(0.0)
            continue
        a0, b0, a1, b1 = (v + edge for v, edge in zip(mask_box(mask), (0.0, 0.0, 1.0, 1.0)))
        inter = max(0.0, min(a1, x1) - max(a0, x0)) * max(0.0, min(b1, y1) - max(b0, y0))
        fits.append(inter / ((a1 - a0) * (b1 - b0) + (x1 - x0) * (y1 - y0) - inter))
    best = max(range(len(fits)), key=lambda i: (fits[i], iou[i]))
    return best if fits[by_iou] < BOX_FIT_POOR and fits[best] >= BOX_FIT_GOOD else by_iou


def _check_select(select, gt, image_size: tuple[int, int]):
    if isinstance(select, (int, np.integer)) and not isinstance(select, bool):
        if not 0 <= int(select) <= 2:
            raise ValueError(f"select index must be 0, 1 or 2, got {select}")
        return int(select)
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(SELECT_MODES)} or an output index, got {select!r}")
    if select == "oracle":
        if gt is None:
            raise ValueError("select='oracle' needs gt (evaluation only)")
        if np.shape(gt) != image_size:
            raise ValueError(f"gt shape {np.shape(gt)} != image (H, W) {image_size}")
    return select
