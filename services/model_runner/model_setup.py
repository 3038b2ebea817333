"""Which detector runs a request and how its input is prepared: the model loaded (a path, ``file://``,
``s3://`` or an endpoint), its input scaling (and, for uint8 images, the scaling folded into the model),
the tile grid settled from the request and the model, the batch-size limit, and the reader's threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from services.cloud import objects
from services.errors import UserError
from services.inference.detector import DEFAULT_BATCH, Detector, OnnxDetector, usable_cores
from services.inference.endpoint import EndpointDetector
from services.inference.session import CPU
from services.model_runner.request import ImageRequest, local_model_path
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling, ScalingRule
from services.tiling.windows import Grid

#: Strip-decoding threads beside a model that runs on this CPU: decoding takes the model's cores, and two
#: threads hide the reads' latency (bench/README.md, "Pipeline efficiency": more change nothing).
READER_THREADS_BESIDE_CPU_MODEL = 2
#: The most strip-decoding threads when the model runs elsewhere (a GPU, an endpoint).
MAX_READER_THREADS = 8
MAX_BATCH_ENV = "TESSERA_MAX_BATCH_MB"
#: One batch of float32 input may take this much (512 px x 512 px x 3 x 8 tiles is 24 MiB; the reader, the
#: prefetch and each session hold batches, so a worker's peak is a few times this).
DEFAULT_MAX_BATCH_MB = 512.0


def load_model_bytes(model: str, *, s3_client: Any = None) -> bytes:
    """The ONNX file a request names: a path, ``file://`` or ``s3://`` URI. Missing -> UserError."""
    if model.startswith("s3://"):
        return objects.read_object(model, s3_client)
    return local_model_path(model).read_bytes()


def open_detector(
    request: ImageRequest, *, providers: str = "auto", s3_client: Any = None, model_bytes: bytes | None = None
) -> Detector:
    """The detector a request names (an ONNX model, or a model served at an endpoint), with the request's
    batch size and score threshold.

    A missing model, or one that does not fit the detector contract, raises UserError.
    """
    if request.endpoint is not None:
        return EndpointDetector(
            request.endpoint.url,
            tile_width=request.endpoint.tile_size[0],
            tile_height=request.endpoint.tile_size[1],
            class_names=list(request.endpoint.class_names),
            score_threshold=request.merge.score_threshold,
            batch_size=request.batch_size or DEFAULT_BATCH,
        )
    assert request.model is not None
    data = model_bytes if model_bytes is not None else load_model_bytes(request.model, s3_client=s3_client)
    return OnnxDetector(
        data,
        providers=providers,
        batch_size=request.batch_size,
        score_threshold=request.merge.score_threshold,
        tile_size=request.tile_size,
    )


def input_scaling(detector: Detector, rule: ScalingRule | None = None) -> InputScaling:
    """How image pixels are scaled for this detector: from an ONNX model's metadata; [0, 1] for endpoints;
    a request's ``rule`` wins (services/tiling/scaling.py)."""
    if isinstance(detector, OnnxDetector):
        return InputScaling.from_metadata(detector.metadata, channels=detector.channels, rule=rule)
    return InputScaling(channels=detector.channels).with_rule(rule)


def batch_limit_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The most bytes one batch of model input may take (``TESSERA_MAX_BATCH_MB``, default 512 MiB)."""
    text = (os.environ if environ is None else environ).get(MAX_BATCH_ENV, "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_MAX_BATCH_MB
    except ValueError:
        raise UserError(f"{MAX_BATCH_ENV} must be a number of MiB, got {text!r}") from None
    if not megabytes > 0:
        raise UserError(f"{MAX_BATCH_ENV} must be more than 0 MiB, got {text!r}")
    return int(megabytes * 2**20)


def check_batch_size(detector: Detector, limit: int | None = None) -> None:
    """Refuse a tile size x batch whose float32 input would not fit the batch limit (a 16384 px tile is
    3 GiB a tile): the reader, the sessions and the prefetch each hold batches, so one must stay small."""
    limit = batch_limit_bytes() if limit is None else limit
    tile = detector.tile_width * detector.tile_height * detector.channels * 4
    if tile * detector.batch_size <= limit:
        return
    fits = limit // tile
    fix = (
        f"use batch_size (tessera run --batch) {fits} or less, or smaller tiles"
        if fits >= 1
        else f"use smaller tiles (one {detector.tile_width}x{detector.tile_height} tile is over the limit)"
    )
    raise UserError(
        f"a batch of {detector.batch_size} tile{'s' if detector.batch_size != 1 else ''} of "
        f"{detector.tile_width}x{detector.tile_height}x"
        f"{detector.channels} float32 is {tile * detector.batch_size / 2**20:,.0f} MiB, over the "
        f"{limit / 2**20:,.0f} MiB a batch may take ({MAX_BATCH_ENV}); {fix}"
    )


def settle_grid(request: ImageRequest, detector: Detector) -> Grid:
    """Tile size (the model's, which the detector checked against the request's), overlap (the request's,
    else an eighth of the tile) and region size; a tile x batch too big for memory is refused
    (:func:`check_batch_size`)."""
    check_batch_size(detector)
    tile_w, tile_h = detector.tile_width, detector.tile_height
    overlap_x, overlap_y = request.overlap if request.overlap is not None else (tile_w // 8, tile_h // 8)
    region_w, region_h = request.region_size
    return Grid(tile_w, tile_h, overlap_x, overlap_y, region_w, region_h)


#: Set to 1 to keep converting pixels to float32 on the CPU instead of folding the scaling into the model.
FLOAT_INPUT_ENV = "TESSERA_FLOAT_INPUT"


def native_detector(
    detector: Detector, scaling: InputScaling, source: RasterSource, bands: Sequence[int] | None = None
) -> tuple[OnnxDetector, int] | None:
    """``detector`` composed to take the image's own uint8 pixels, its scaling folded into the graph
    (:meth:`OnnxDetector.for_uint8`), and the pixel value that pads a tile (one the scaling makes 0); None
    where that does not apply: an endpoint, an image that is not
    uint8, a scaling that is not affine, or ``TESSERA_FLOAT_INPUT=1``. The CPU then writes a quarter of
    the bytes per tile, and a GPU receives a quarter (bench/README.md, "Pipeline floor")."""
    if not isinstance(detector, OnnxDetector) or os.environ.get(FLOAT_INPUT_ENV, "").strip() == "1":
        return None
    settled = scaling.for_image(source.dtype, source.count, nbits=source.nbits, bands=bands)
    affine = settled.uint8_affine(source.dtype, source.nodata)
    if affine is None:
        return None
    native = detector.for_uint8(*affine)
    return (native, affine[1]) if native is not None else None


def reader_threads(detector: Detector) -> int:
    """How many threads decode strips for ``detector``: :data:`READER_THREADS_BESIDE_CPU_MODEL` when the
    model runs on this CPU; otherwise every core but the tile assembler's (2 to :data:`MAX_READER_THREADS`),
    since decoding DEFLATE at ~1 ms per 512 px tile and core is what feeds a GPU."""
    if isinstance(detector, OnnxDetector) and detector.provider == CPU:
        return READER_THREADS_BESIDE_CPU_MODEL
    return max(READER_THREADS_BESIDE_CPU_MODEL, min(MAX_READER_THREADS, usable_cores() - 1))
