"""Object detectors in ONNX, run tile batch by tile batch.

The detector contract
=====================

A tessera detector is an ONNX model with

- **one input** ``[N, C, H, W]`` float32. ``C`` is fixed in the model; ``H`` and ``W`` are fixed in the model
  (the tile size), or dynamic, in which case the caller passes ``tile_size=(W, H)``. ``N`` is dynamic
  (batches of ``batch_size``) or fixed (batches of exactly that size). Batches always have the same shape:
  the last, short one is padded with zeros and the padding's results are dropped.
- **input values** scaled as the model's metadata ``tessera.input_scale`` says (default ``"1/255"``: uint8
  pixels divided by 255; the tiling library turns this into its input scaling).
- **outputs**, either
  - three tensors ``boxes [N, K, 4]`` (``x1, y1, x2, y2`` in tile pixels), ``scores [N, K]`` and
    ``labels [N, K]`` (int64, int32, or float holding whole numbers). They are told apart by name
    (``box``, ``score``/``conf``, ``label``/``class``) or else by rank and type. Rows with a score below
    ``score_threshold`` or a negative label are padding and are dropped; or
  - the raw head of an **Ultralytics YOLO** detection export: one tensor ``[N, 4 + classes, anchors]``
    holding ``(cx, cy, w, h)`` in input pixels and one score per class. It is decoded to the best class
    per anchor, thresholded, and suppressed per tile with class-aware greedy NMS
    (``yolo_iou_threshold``).
- **class names** in the metadata ``tessera.class_names`` as a JSON list (``labels`` index it). For YOLO
  exports Ultralytics' own ``names`` metadata is read when ``tessera.class_names`` is absent.

Anything else is refused when the model is loaded, with a UserError that says what the model has and what
the contract expects.

What a model returns is checked before it leaves the detector
(:func:`~services.inference.detections.check_boxes`): boxes with a NaN or infinite coordinate or score,
inverted or empty boxes and boxes wholly outside the tile are dropped, boxes partly outside are clipped to
the tile, scores outside [0, 1] are clamped to it; each kind is counted and handed to ``on_checks``.

Every batch runs under a :class:`~services.inference.run_control.RunControl`: a batch that outlives
``batch_timeout_s`` (``TESSERA_BATCH_TIMEOUT_S``) is stopped and fails with a
:class:`~services.inference.run_control.ModelTimeoutError`; :meth:`OnnxDetector.stop` stops the batches
in flight (a worker draining); batches run on pool threads, so the caller's thread stays free to take
Ctrl-C, and the batches in flight are stopped when it does.

This module stays one file (~530 lines): it is the contract and the one class that enforces it — loading,
the input and output checks, running batches side by side, decoding — and each part reads the others' state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.errors import UserError
from services.inference.detections import BoxChecks, Detections, check_tiles
from services.inference.native_input import cached_fold
from services.inference.run_control import Run, RunControl
from services.inference.session import CPU, CUDA, create_session
from services.inference.side_by_side import BusyClock, run_side_by_side
from services.inference.yolo import decode_yolo, ultralytics_class_names

CLASS_NAMES_KEY = "tessera.class_names"
INPUT_SCALE_KEY = "tessera.input_scale"
NAME_KEY = "tessera.name"

_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}
_FLOAT_TYPES = {"tensor(float)", "tensor(double)", "tensor(float16)"}
_LABEL_TYPES = {"tensor(int64)", "tensor(int32)", *_FLOAT_TYPES}

#: At most this many CPU sessions, however many cores the machine has: each holds its own buffers (on
#: the 100k x 100k memory benchmark a second session added ~260 MB to the worker's peak RSS).
MAX_CPU_SESSIONS = 4
#: Tiles per model call where none is asked for, on a GPU (or when the model fixes none, one session).
DEFAULT_BATCH = 8
#: Where none is asked for, a CPU batch is the most tiles whose float32 input fits in this many bytes (at
#: least one, at most :data:`DEFAULT_BATCH`): 2 tiles of 512 x 512 x 3. Each session's intermediate
#: tensors then stay in the cache beside the tile reader's strips; on 2 cores, batches of 2 against 8 took
#: 0.3 CPU s less on the 16,000 px near-free run and 10% less time with the demo detector
#: (bench/README.md, "Pipeline floor").
CPU_BATCH_BYTES = 8 * 2**20


def default_batch_size(provider: str, channels: int, tile_height: int, tile_width: int) -> int:
    """Tiles per call when the caller asks for none: :data:`DEFAULT_BATCH` on a GPU; on the CPU, as many
    as fit in :data:`CPU_BATCH_BYTES` of float32 input (1 to :data:`DEFAULT_BATCH`)."""
    if provider != CPU:
        return DEFAULT_BATCH
    tile_bytes = 4 * channels * tile_height * tile_width
    return max(1, min(DEFAULT_BATCH, CPU_BATCH_BYTES // max(1, tile_bytes)))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


CONTRACT = (
    "one input [N, C, H, W] float32 and either three outputs boxes [N, K, 4], scores [N, K], labels [N, K] "
    "or one raw Ultralytics YOLO output [N, 4 + classes, anchors]"
)


class Detector(Protocol):
    """What the pipeline needs from a detector, local (:class:`OnnxDetector`) or remote
    (:class:`services.inference.endpoint.EndpointDetector`)."""

    name: str
    provider: str
    channels: int
    tile_width: int
    tile_height: int
    batch_size: int
    class_names: list[str]

    def detect(self, pixels: np.ndarray) -> list[Detections]:
        """Detections in tile pixels, one per tile of ``pixels`` float32 ``[B, C, H, W]``."""
        ...


@dataclass(frozen=True)
class _Outputs:
    """Which session output is which; ``yolo`` when the model has the raw YOLO head."""

    yolo: bool
    boxes: int = 0
    scores: int = 1
    labels: int = 2
    n_classes: int = 0


class OnnxDetector:
    """A detector model in ONNX Runtime; see the module docstring for the contract it checks.

    ``providers``: ``"auto"`` (CUDA when it works, else CPU), ``"cpu"`` or ``"cuda"``; ``.provider`` says
    which one runs. ``batch_size`` tiles go to the model per run (a model with a fixed batch dimension
    sets it; None: :func:`default_batch_size` for the provider). ``tile_size`` ``(width, height)`` is
    needed only for models with dynamic H/W.

    On the CPU provider (and ``intra_op_threads`` not given) the detector opens ``sessions`` sessions of one
    intra-op thread each (default: one per usable core; past ``MAX_CPU_SESSIONS`` sessions, each gets
    ``cores // sessions`` threads) and runs *batches* in parallel on them (:meth:`detect_many`), instead
    of one session splitting every operator over all cores: there is no per-operator barrier for a thread
    to spin at while another is descheduled (by the tile reader, say). ONNX Runtime releases the GIL while
    a session runs, so threads suffice. CUDA, an explicit ``intra_op_threads`` or a single core keep one
    session.
    """

    def __init__(
        self,
        model: str | bytes | Path,
        *,
        providers: str = "auto",
        batch_size: int | None = DEFAULT_BATCH,
        score_threshold: float = 0.25,
        intra_op_threads: int | None = None,
        tile_size: tuple[int, int] | None = None,
        yolo_iou_threshold: float = 0.45,
        sessions: int | None = None,
        batch_timeout_s: float | None = None,
        _uint8_input: bool = False,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if sessions is not None and sessions < 1:
            raise UserError(f"sessions must be at least 1, got {sessions}")
        cores = usable_cores()
        count = sessions or min(cores, MAX_CPU_SESSIONS)
        pooled = intra_op_threads is None and count > 1
        # Every core busy: beyond MAX_CPU_SESSIONS, the sessions share the cores out as intra-op threads.
        each = 1 if sessions else max(1, cores // count)
        # "auto" may end on CUDA (one session, default threads); on the CPU it is opened again, pooled.
        opened = create_session(
            model,
            providers=providers,
            intra_op_threads=each if pooled and providers == "cpu" else intra_op_threads,
        )
        self.provider: str = opened.provider
        if pooled and self.provider == CPU:
            if providers != "cpu":
                opened = create_session(model, providers="cpu", intra_op_threads=each)
            more = [create_session(model, providers="cpu", intra_op_threads=each) for _ in range(count - 1)]
            self._sessions: list[Any] = [opened.session] + [m.session for m in more]
        else:
            self._sessions = [opened.session]
        self._session = opened.session
        self._model = model
        self._options: dict[str, Any] = {
            "providers": "cuda" if self.provider == CUDA else "cpu",
            "score_threshold": score_threshold,
            "intra_op_threads": intra_op_threads,
            "yolo_iou_threshold": yolo_iou_threshold,
            "sessions": sessions,
            "batch_timeout_s": batch_timeout_s,
        }
        self._folded: dict[tuple[float, int, float | None], OnnxDetector | None] = {}
        #: What a batch holds: float32 per the contract, uint8 for a model composed by :meth:`for_uint8`.
        self.input_dtype: type[np.generic] = np.uint8 if _uint8_input else np.float32
        meta = opened.session.get_modelmeta()
        self.metadata: dict[str, str] = dict(meta.custom_metadata_map or {})
        self.name: str = self.metadata.get(NAME_KEY) or (
            opened.name if opened.name != "model" else (meta.graph_name or "model")
        )
        self.input_scale: str | None = self.metadata.get(INPUT_SCALE_KEY)
        self.score_threshold = float(score_threshold)
        self.yolo_iou_threshold = float(yolo_iou_threshold)

        self._input_name, fixed_batch, self.channels, self.tile_height, self.tile_width = self._check_input(
            tile_size
        )
        self.batch_size: int = (
            fixed_batch
            or batch_size
            or default_batch_size(self.provider, self.channels, self.tile_height, self.tile_width)
        )
        self._outputs = self._check_outputs()
        self.class_names: list[str] = self._class_names()
        #: Timeouts and stops of this model's batches (``batch_timeout_s``, else TESSERA_BATCH_TIMEOUT_S).
        self.control = RunControl(self.name, batch_timeout_s)

    def __repr__(self) -> str:
        return (
            f"OnnxDetector({self.name!r}, {self.channels}x{self.tile_height}x{self.tile_width}, "
            f"batch {self.batch_size}, {self.provider})"
        )

    @property
    def is_yolo(self) -> bool:
        """Whether the model has the raw Ultralytics YOLO head (decoded and suppressed here)."""
        return self._outputs.yolo

    def class_name(self, label: int) -> str:
        """The class name of ``label``, or the label as text when the model names no such class."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def detect(
        self, pixels: np.ndarray, *, on_checks: Callable[[BoxChecks], None] | None = None
    ) -> list[Detections]:
        """Detections in tile pixels, one :class:`Detections` per tile of ``pixels`` ``[B, C, H, W]``
        (float32, scaled per the contract). Runs in batches of ``batch_size``, padding the last one.
        ``on_checks`` is called with what the output checks dropped and changed, once per batch."""
        pixels = np.asarray(pixels, dtype=self.input_dtype)
        expected = (self.channels, self.tile_height, self.tile_width)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise UserError(
                f"model {self.name} takes tiles [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(pixels.shape)}"
            )
        bs = self.batch_size
        batches = (pixels[start : start + bs] for start in range(0, pixels.shape[0], bs))
        return [found for batch in self.detect_many(batches, on_checks=on_checks) for found in batch]

    @property
    def sessions(self) -> int:
        """How many sessions run batches side by side (1 on CUDA)."""
        return len(self._sessions)

    def detect_many(
        self,
        batches: Iterable[np.ndarray],
        *,
        on_checks: Callable[[BoxChecks], None] | None = None,
        busy: BusyClock | None = None,
    ) -> Iterator[list[Detections]]:
        """Detections for each batch of ``batches`` (float32 ``[B, C, H, W]``, ``B <= batch_size``), in order.
        ``on_checks`` is called with what the output checks did to each batch, in the caller's thread;
        ``busy`` adds up the wall time a batch was running.

        Each session's own thread draws its next batch from ``batches`` and runs it, so a session that
        finishes takes the next batch at once; at most ``2 x sessions`` batches are drawn ahead of the
        results taken (:func:`~services.inference.side_by_side.run_side_by_side`). ``batches`` is advanced
        from those threads, one at a time.
        """
        for found, checks in run_side_by_side(
            self._sessions,
            batches,
            prepare=self._checked,
            run_one=self._run,
            control=self.control,
            ahead=2 * len(self._sessions),
            busy=busy,
        ):
            if on_checks is not None:
                on_checks(checks)
            yield found

    def stop(self, reason: str) -> None:
        """Stop the batches in flight (between two operators) and refuse new ones: they fail with
        :class:`~services.inference.run_control.RunStoppedError` carrying ``reason``."""
        self.control.stop(reason)

    @property
    def stuck(self) -> bool:
        """Whether a batch outlived its timeout and did not stop: a thread of this process is lost to it."""
        return self.control.stuck

    def close(self) -> None:
        """Close the detectors composed for uint8 input (:meth:`for_uint8`). The threads that run batches
        side by side belong to each :meth:`detect_many` call and end with it."""
        for folded in self._folded.values():
            if folded is not None:
                folded.close()

    def for_uint8(self, scale: float, zero_point: int, clip_max: float | None) -> OnnxDetector | None:
        """This model taking uint8 tiles, its input scaling ``(x - zero_point) * scale`` (clipped to
        ``[0, clip_max]`` when given) folded into the graph (:mod:`services.inference.native_input`);
        composed once per scaling and kept. It shares this detector's sessions' settings, name and run
        control (a :meth:`stop` here stops its batches too). None when the model cannot be composed."""
        key = (float(scale), int(zero_point), clip_max)
        if key not in self._folded:
            model = self._model if isinstance(self._model, bytes) else Path(self._model).read_bytes()
            composed = cached_fold(model, scale=scale, zero_point=zero_point, clip_max=clip_max)
            folded = None
            if composed is not None:
                folded = OnnxDetector(
                    composed,
                    batch_size=self.batch_size,
                    tile_size=(self.tile_width, self.tile_height),
                    _uint8_input=True,
                    **self._options,
                )
                folded.name, folded.control = self.name, self.control
            self._folded[key] = folded
        return self._folded[key]

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=self.input_dtype)
        expected = (self.channels, self.tile_height, self.tile_width)
        if (
            batch.ndim != 4
            or tuple(batch.shape[1:]) != expected
            or not 1 <= batch.shape[0] <= self.batch_size
        ):
            raise UserError(
                f"model {self.name} takes batches [1..{self.batch_size}, {expected[0]}, {expected[1]}, "
                f"{expected[2]}], got {list(batch.shape)}"
            )
        return batch

    def _run(self, session: Any, batch: np.ndarray, run: Run) -> tuple[list[Detections], BoxChecks]:
        """One batch (``B <= batch_size`` tiles) on ``session`` under ``run``'s options, padded with zeros
        to the batch shape; its checked detections and what the checks did."""
        n, bs = batch.shape[0], self.batch_size
        if n < bs:
            batch = np.concatenate([batch, np.zeros((bs - n, *batch.shape[1:]), dtype=batch.dtype)])
        try:
            raw = session.run(None, {self._input_name: np.ascontiguousarray(batch)}, run.options)
        except Exception as error:  # ONNX Runtime's own types; a stop or timeout is re-raised as such
            self.control.finish(run, error)
            raise
        self.control.finish(run, None)
        return self._decode(raw, n)

    def _decode(self, raw: Sequence[np.ndarray], n: int) -> tuple[list[Detections], BoxChecks]:
        o = self._outputs
        if o.yolo:
            head = np.asarray(raw[0])
            if head.ndim != 3 or head.shape[1] != 4 + o.n_classes:
                raise UserError(
                    f"model {self.name} returned {list(head.shape)}, not [N, {4 + o.n_classes}, anchors]"
                )
            return decode_yolo(
                head[:n],
                score_threshold=self.score_threshold,
                iou_threshold=self.yolo_iou_threshold,
                tile_width=self.tile_width,
                tile_height=self.tile_height,
            )
        boxes = np.asarray(raw[o.boxes])
        scores = np.asarray(raw[o.scores])
        labels = np.asarray(raw[o.labels])
        bs = self.batch_size
        if (
            boxes.ndim != 3
            or boxes.shape[0] != bs
            or boxes.shape[2] != 4
            or scores.shape != boxes.shape[:2]
            or labels.shape != boxes.shape[:2]
        ):
            raise UserError(
                f"model {self.name} returned boxes {list(boxes.shape)}, scores {list(scores.shape)}, "
                f"labels {list(labels.shape)} for a batch of {bs}; the contract wants [{bs}, K, 4], "
                f"[{bs}, K], [{bs}, K]"
            )
        if labels.dtype.kind == "f":
            labels = np.rint(np.nan_to_num(labels, nan=-1.0))
        labels = labels.astype(np.int64)
        # Padding: a score below the threshold or a negative label. A NaN score is no padding: it is
        # counted by the checks as a non-finite detection.
        keep = (~(scores < self.score_threshold) & (labels >= 0))[:n]
        # The batch's boxes as one set, tile by tile, checked at once and split back into tiles.
        every = Detections(boxes[:n][keep], scores[:n][keep], labels[:n][keep])
        return check_tiles(every, keep.sum(axis=1), self.tile_width, self.tile_height)

    def _check_input(self, tile_size: tuple[int, int] | None) -> tuple[str, int | None, int, int, int]:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise UserError(
                f"model {self.name} has {len(inputs)} inputs ({_describe(inputs)}); the detector contract "
                f"wants {CONTRACT}"
            )
        (inp,) = inputs
        shape = list(inp.shape)
        wanted = "tensor(uint8)" if self.input_dtype is np.uint8 else "tensor(float)"
        if len(shape) != 4 or inp.type != wanted:
            raise UserError(
                f"model {self.name} takes {_describe(inputs)}; the detector contract wants one input "
                f"[N, C, H, W] float32"
            )
        n, c, h, w = (d if isinstance(d, int) and d > 0 else None for d in shape)
        if c is None:
            raise UserError(f"model {self.name} takes {_describe(inputs)}: the channel count C must be fixed")
        if tile_size is not None:
            tw, th = (int(v) for v in tile_size)
            if (w is not None and w != tw) or (h is not None and h != th):
                raise UserError(
                    f"tile size {tw}x{th} does not fit model {self.name}, which takes {w}x{h} tiles (W x H)"
                )
            w, h = tw, th
        if h is None or w is None:
            raise UserError(
                f"model {self.name} takes {_describe(inputs)} with a dynamic tile size; give the tile size "
                f"(tile_size=(W, H))"
            )
        return inp.name, n, c, h, w

    def _check_outputs(self) -> _Outputs:
        outputs = self._session.get_outputs()
        shapes = [list(o.shape) for o in outputs]
        wrong = UserError(
            f"model {self.name} returns {_describe(outputs)}; the detector contract wants {CONTRACT}"
        )
        if len(outputs) == 1:
            (shape,) = shapes
            rows = shape[1] if len(shape) == 3 else None
            if not isinstance(rows, int) or rows < 5 or outputs[0].type not in _FLOAT_TYPES:
                raise wrong
            anchors = shape[2]
            if anchors == 4:  # a lone boxes output: scores and labels are missing
                raise wrong
            if isinstance(anchors, int) and anchors < rows:
                raise UserError(
                    f"model {self.name} returns {_describe(outputs)}, which looks like a transposed YOLO "
                    f"head [N, anchors, 4 + classes]; export it with Ultralytics' default layout "
                    f"[N, 4 + classes, anchors]"
                )
            return _Outputs(yolo=True, n_classes=rows - 4)
        if len(outputs) != 3:
            raise wrong
        names = [o.name.lower() for o in outputs]
        by_name = [
            _only(names, ("box",)),
            _only(names, ("score", "conf")),
            _only(names, ("label", "class")),
        ]
        if None not in by_name and len(set(by_name)) == 3:
            boxes, scores, labels = (int(i) for i in by_name if i is not None)
        else:
            ranks = [len(s) for s in shapes]
            if sorted(ranks) != [2, 2, 3]:
                raise wrong
            boxes = ranks.index(3)
            pair = [i for i in range(3) if i != boxes]
            ints = [i for i in pair if outputs[i].type not in _FLOAT_TYPES]
            labels = ints[0] if len(ints) == 1 else pair[1]
            scores = pair[0] if labels == pair[1] else pair[1]
        box_shape, score_shape, label_shape = shapes[boxes], shapes[scores], shapes[labels]
        last = box_shape[2] if len(box_shape) == 3 else None
        if (
            len(box_shape) != 3
            or (isinstance(last, int) and last != 4)
            or len(score_shape) != 2
            or len(label_shape) != 2
            or outputs[boxes].type not in _FLOAT_TYPES
            or outputs[scores].type not in _FLOAT_TYPES
            or outputs[labels].type not in _LABEL_TYPES
        ):
            raise wrong
        return _Outputs(yolo=False, boxes=boxes, scores=scores, labels=labels)

    def _class_names(self) -> list[str]:
        text = self.metadata.get(CLASS_NAMES_KEY)
        n_classes = self._outputs.n_classes
        if text is not None:
            try:
                names = json.loads(text)
            except ValueError as exc:
                raise UserError(f"model {self.name}: metadata {CLASS_NAMES_KEY} is not JSON: {exc}") from exc
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UserError(f"model {self.name}: metadata {CLASS_NAMES_KEY} must be a JSON list of names")
            if n_classes and len(names) != n_classes:
                raise UserError(
                    f"model {self.name} has {n_classes} classes but metadata {CLASS_NAMES_KEY} names "
                    f"{len(names)}"
                )
            return list(names)
        if self._outputs.yolo:
            return ultralytics_class_names(self.metadata, n_classes) or [
                f"class_{i}" for i in range(n_classes)
            ]
        return []


def _only(names: list[str], needles: tuple[str, ...]) -> int | None:
    hits = [i for i, n in enumerate(names) if any(s in n for s in needles)]
    return hits[0] if len(hits) == 1 else None


def _describe(values: Sequence[Any]) -> str:
    parts = []
    for v in values:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in v.shape)
        parts.append(f"{v.name!r} {_TYPES.get(v.type, v.type)} [{dims}]")
    return ", ".join(parts) if parts else "nothing"
