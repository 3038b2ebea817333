"""The bad-input corpus: what a careless or hostile user can hand the model runner, kept as one table.

Every row builds a real bad input under ``tmp_path`` (a file, a model, a request) and states a fragment of
the message that must name what is wrong or what to fix. Rows ``via="run"`` go through the front door,
``services.cli.main(["run", ...])`` in process, and must end with exit status 2 and one message on stderr
— the line ``tessera run: ...`` (for the request checker: its headline, then one indented ``$.path:`` line
per problem, the format of services/jobs/documents.py) — with no traceback, nothing on stdout and nothing
left behind or changed under ``tmp_path`` (no output, no ``.partial`` temporary). Rows ``via="queue"``
hand a request document to :func:`services.model_runner.request.parse_request` under a queue worker's
confined policy and must get a UserError naming the offending field's JSON path.

Not in the table, because they are not errors: an image smaller than a tile runs on one zero-padded tile, and
an image that is all nodata gives an empty FeatureCollection (every tile skipped and counted).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from bad_inputs import (
    DEMO_MODEL,
    LONLAT_INSIDE,
    file_of,
    geojson,
    onnx_file,
    out_dir,
    out_path,
    polygon,
    queue_policy,
    queued,
    raster,
    run_argv,
    scene,
    square_model,
)
from onnx import TensorProto
from onnx_builders import contract_model, shaped_model, yolo_model
from square_world import build_wrong_shape_model

from services.cli import main
from services.errors import UserError
from services.model_runner.request import parse_request

GROUPS = ("image", "model", "request", "roi", "output")
#: A request document as the queue carries it: JSON text, bytes or an object.
Document = str | bytes | Mapping[str, Any]
#: What a capped row may allocate beyond what the process already holds.
MEMORY_HEADROOM = 2 * 2**30
_CAPPABLE = sys.platform.startswith("linux")

AS_ROOT = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads and writes whatever the mode bits say"
)


@dataclass(frozen=True)
class Bad:
    """One kind of bad input: ``build(tmp_path)`` writes it and returns the ``tessera run`` argv (``via``
    "run") or the request document (``via`` "queue"); ``says`` is a fragment of the message."""

    id: str
    group: str
    build: Callable[[Path], Sequence[str] | Document]
    says: str
    via: str = "run"
    #: Run under an address-space cap of what the process holds plus MEMORY_HEADROOM: a row that would
    #: allocate gigabytes if its refusal regressed fails with a MemoryError instead of taking the machine.
    memory_cap: bool = False


def row(
    id: str,
    group: str,
    build: Callable[[Path], Sequence[str] | Document],
    says: str,
    *,
    via: str = "run",
    memory_cap: bool = False,
    marks: Sequence[pytest.MarkDecorator] = (),
) -> Any:
    if memory_cap:
        marks = [*marks, pytest.mark.skipif(not _CAPPABLE, reason="needs RLIMIT_AS and /proc/self/status")]
    return pytest.param(Bad(id, group, build, says, via, memory_cap), id=id, marks=list(marks))


# ---- builders of the bad inputs that need more than one line ----


def _half_of(path: Path, tmp: Path, name: str, keep: int | None = None) -> Path:
    data = path.read_bytes()
    return file_of(tmp, name, data[: keep if keep is not None else len(data) // 2])


def _no_read_permission(tmp: Path) -> list[str]:
    image = scene(tmp)
    image.chmod(0)
    return run_argv(tmp, image=image)


def _not_writable(tmp: Path) -> list[str]:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return run_argv(tmp, out=locked / "result.geojson")


def _symlink_out_of_root(tmp: Path) -> Document:
    (tmp / "elsewhere").mkdir()
    (out_dir(tmp) / "link").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return queued(tmp, outputs={"path": "link/result.geojson"})


def _directory(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


def _roi(tmp: Path, document: Any, *extra: str) -> list[str]:
    return run_argv(tmp, "--roi", geojson(tmp, document), *extra)


def _roi_text(tmp: Path, text: str | bytes, *extra: str) -> list[str]:
    return run_argv(tmp, "--roi", file_of(tmp, "roi.txt", text), *extra)


def _tensor(name: str, dtype: int, *shape: int | str) -> tuple[str, int, list[int | str]]:
    """An input or output of :func:`onnx_builders.shaped_model`."""
    return name, dtype, list(shape)


_FLOAT, _INT64 = TensorProto.FLOAT, TensorProto.INT64
_MODEL_OUT = [_tensor("boxes", _FLOAT, "N", 3, 4), _tensor("scores", _FLOAT, "N", 3)]
_LABELS = _tensor("labels", _INT64, "N", 3)
_TILE_IN = _tensor("pixels", _FLOAT, "N", 3, 32, 32)
_NODATA = np.zeros((3, 96, 96), np.uint8)

CORPUS = [
    # ---- images ----
    row("image-missing-file", "image", lambda t: run_argv(t, image=t / "nowhere.tif"), "does not exist"),
    row(
        "image-is-a-directory",
        "image",
        lambda t: run_argv(t, image=_directory(t, "tiles")),
        "is a directory, not a raster file",
    ),
    row(
        "image-empty-file",
        "image",
        lambda t: run_argv(t, image=file_of(t, "empty.tif", b"")),
        "as a raster image",
    ),
    row(
        "image-text-named-tif",
        "image",
        lambda t: run_argv(t, image=file_of(t, "notes.tif", "harbour survey, July\n")),
        "as a raster image",
    ),
    row(
        "image-random-bytes",
        "image",
        lambda t: run_argv(t, image=file_of(t, "noise.tif", np.random.default_rng(3).bytes(4096))),
        "as a raster image",
    ),
    row(
        "image-truncated-in-the-header",
        "image",
        lambda t: run_argv(t, image=_half_of(scene(t), t, "cut.tif", keep=200)),
        "as a raster image",
    ),
    row(
        "image-truncated-in-the-pixels",
        "image",
        lambda t: run_argv(t, image=_half_of(scene(t), t, "half.tif")),
        "failed at Window",
    ),
    row(
        "image-with-no-bands",
        "image",
        lambda t: run_argv(
            t, image=file_of(t, "empty.vrt", '<VRTDataset rasterXSize="64" rasterYSize="64"></VRTDataset>')
        ),
        "as a raster image",
    ),
    row(
        "image-two-bands-for-three-channels",
        "image",
        lambda t: run_argv(t, image=scene(t, bands=2)),
        "the image has 2 bands but the model takes 3 channels",
    ),
    row(
        "image-grey-for-a-colour-model",
        "image",
        lambda t: run_argv(t, image=scene(t, bands=1)),
        '"bands": "replicate"',
    ),
    row(
        "image-complex-pixels",
        "image",
        lambda t: run_argv(t, image=raster(t, np.ones((3, 64, 64), np.complex64), name="iq.tif")),
        "pixels of type complex64 cannot be scaled",
    ),
    row(
        "image-float-pixels-without-a-range",
        "image",
        lambda t: run_argv(t, image=raster(t, np.full((3, 64, 64), 0.5, np.float32), name="refl.tif")),
        "--scale LOW,HIGH",
    ),
    row(
        "image-signed-pixels-without-a-range",
        "image",
        lambda t: run_argv(t, image=raster(t, np.full((3, 64, 64), -7, np.int16), name="dem.tif")),
        "signed pixels",
    ),
    row(
        "image-without-read-permission",
        "image",
        _no_read_permission,
        "as a raster image",
        marks=[AS_ROOT],
    ),
    row(
        "image-s3-url-without-a-key",
        "image",
        lambda t: run_argv(t, image="s3://imagery"),
        "$.image: 's3://imagery' names no object",
    ),
    row(
        "image-s3-without-credentials",
        "image",
        lambda t: run_argv(t, image="s3://imagery/scene.tif"),
        "cannot read s3://imagery/scene.tif as a raster image",
    ),
    row(
        "image-gdal-virtual-path",
        "image",
        lambda t: run_argv(t, image="/vsicurl/http://169.254.169.254/latest/meta-data/"),
        "is a GDAL virtual path",
    ),
    row(
        "image-http-url",
        "image",
        lambda t: run_argv(t, image="http://imagery.example/scene.tif"),
        "http:// is not read",
    ),
    row(
        "image-file-url-with-a-host",
        "image",
        lambda t: run_argv(t, image="file://fileserver/share/scene.tif"),
        "is not a local file URL",
    ),
    row("image-empty-path", "image", lambda t: run_argv(t, image=""), "$.image: must be a path"),
    row(
        "image-path-with-a-newline",
        "image",
        lambda t: run_argv(t, image=f"{scene(t)}\n"),
        "holds a control character",
    ),
    # ---- models ----
    row(
        "model-missing-file",
        "model",
        lambda t: run_argv(t, model=t / "ships.onnx"),
        "does not exist; give the path",
    ),
    row(
        "model-is-a-directory",
        "model",
        lambda t: run_argv(t, model=_directory(t, "weights")),
        "give the path, file:// or s3:// URI of an ONNX file",
    ),
    row(
        "model-empty-file",
        "model",
        lambda t: run_argv(t, model=file_of(t, "empty.onnx", b"")),
        "is not a model ONNX Runtime can load",
    ),
    row(
        "model-not-onnx",
        "model",
        lambda t: run_argv(t, model=file_of(t, "ships.onnx", "name: ships\nepochs: 300\n")),
        "is not a model ONNX Runtime can load",
    ),
    row(
        "model-truncated-onnx",
        "model",
        lambda t: run_argv(t, model=_half_of(DEMO_MODEL, t, "demo-half.onnx")),
        "is not a model ONNX Runtime can load",
    ),
    row(
        "model-and-image-swapped",
        "model",
        lambda t: run_argv(t, image=square_model(t), model=scene(t)),
        "is not a model ONNX Runtime can load",
    ),
    row(
        "model-with-two-inputs",
        "model",
        lambda t: run_argv(
            t,
            model=onnx_file(
                t,
                shaped_model([_TILE_IN, _tensor("mask", _FLOAT, "N", 1)], [*_MODEL_OUT, _LABELS]),
                "two",
            ),
        ),
        "has 2 inputs",
    ),
    row(
        "model-input-of-rank-three",
        "model",
        lambda t: run_argv(
            t,
            model=onnx_file(
                t, shaped_model([_tensor("pixels", _FLOAT, "N", 3, 1024)], [*_MODEL_OUT, _LABELS]), "r3"
            ),
        ),
        "the detector contract wants one input [N, C, H, W] float32",
    ),
    row(
        "model-integer-input",
        "model",
        lambda t: run_argv(
            t,
            model=onnx_file(
                t,
                shaped_model([_tensor("pixels", TensorProto.UINT8, "N", 3, 32, 32)], [*_MODEL_OUT, _LABELS]),
                "u8",
            ),
        ),
        "the detector contract wants one input [N, C, H, W] float32",
    ),
    row(
        "model-dynamic-channels",
        "model",
        lambda t: run_argv(t, model=onnx_file(t, contract_model(channels="C"), "anyc")),  # type: ignore[arg-type]
        "the channel count C must be fixed",
    ),
    row(
        "model-dynamic-tile-without-a-tile-size",
        "model",
        lambda t: run_argv(t, model=onnx_file(t, contract_model(height="H", width="W"), "anyhw")),
        "give the tile size",
    ),
    row(
        "model-tile-size-not-the-models",
        "model",
        lambda t: run_argv(t, "--tile", "128", "128"),
        "tile size 128x128 does not fit model",
    ),
    row(
        "model-one-output-not-a-yolo-head",
        "model",
        lambda t: run_argv(t, model=build_wrong_shape_model(t / "wrong.onnx")),
        "the detector contract wants",
    ),
    row(
        "model-two-outputs",
        "model",
        lambda t: run_argv(t, model=onnx_file(t, shaped_model([_TILE_IN], _MODEL_OUT), "two-out")),
        "the detector contract wants",
    ),
    row(
        "model-boxes-of-five-numbers",
        "model",
        lambda t: run_argv(
            t,
            model=onnx_file(
                t,
                shaped_model(
                    [_TILE_IN],
                    [
                        _tensor("boxes", _FLOAT, "N", 3, 5),
                        _tensor("scores", _FLOAT, "N", 3),
                        _LABELS,
                    ],
                ),
                "box5",
            ),
        ),
        "the detector contract wants",
    ),
    row(
        "model-yolo-head-without-classes",
        "model",
        lambda t: run_argv(
            t,
            model=onnx_file(t, shaped_model([_TILE_IN], [_tensor("output0", _FLOAT, "N", 4, 16)]), "yolo4"),
        ),
        "the detector contract wants",
    ),
    row(
        "model-transposed-yolo-head",
        "model",
        lambda t: run_argv(t, model=onnx_file(t, yolo_model(transposed=True), "yolo-t")),
        "transposed YOLO head",
    ),
    row(
        "model-class-names-not-json",
        "model",
        lambda t: run_argv(
            t, model=onnx_file(t, contract_model(), "csv-names", {"tessera.class_names": "car, truck, ship"})
        ),
        "metadata tessera.class_names is not JSON",
    ),
    row(
        "model-class-names-not-a-list",
        "model",
        lambda t: run_argv(
            t, model=onnx_file(t, contract_model(), "dict-names", {"tessera.class_names": '{"0": "car"}'})
        ),
        "must be a JSON list of names",
    ),
    row(
        "model-class-names-miscounted",
        "model",
        lambda t: run_argv(
            t, model=onnx_file(t, yolo_model(), "yolo-2", {"tessera.class_names": '["car", "truck"]'})
        ),
        "has 3 classes but metadata tessera.class_names names 2",
    ),
    row(
        "model-input-scale-not-a-number",
        "model",
        lambda t: run_argv(
            t, model=onnx_file(t, contract_model(), "scale", {"tessera.input_scale": "one/255"})
        ),
        "is not a number like '1/255'",
    ),
    row(
        "model-input-scale-negative",
        "model",
        lambda t: run_argv(t, model=onnx_file(t, contract_model(), "neg", {"tessera.input_scale": "-1/255"})),
        "must be positive",
    ),
    row(
        "model-input-range-inverted",
        "model",
        lambda t: run_argv(
            t, model=onnx_file(t, contract_model(), "range", {"tessera.input_range": "255,0"})
        ),
        "tessera.input_range",
    ),
    row(
        "model-channels-not-the-images",
        "model",
        lambda t: run_argv(t, model=onnx_file(t, contract_model(channels=4), "rgbn")),
        "the image has 3 bands but the model takes 4 channels",
    ),
    row(
        "model-http-url",
        "model",
        lambda t: run_argv(t, model="https://models.example/ships.onnx"),
        "for a model served over HTTP give endpoint instead",
    ),
    row(
        "model-not-a-name-nor-a-path",
        "model",
        lambda t: run_argv(t, model="ships model"),
        "nor a model registry name",
    ),
    row(
        "model-registry-name-without-a-registry",
        "model",
        # No database configured: this machine's own registry is asked, and it knows no such model.
        lambda t: run_argv(t, model="ships:3"),
        "no model named 'ships' in the registry (the registry is empty); train one with --register ships",
    ),
    row(
        "model-s3-without-credentials",
        "model",
        lambda t: run_argv(t, model="s3://models/ships.onnx"),
        "s3://models/ships.onnx",
    ),
    # ---- requests (tessera run's options) ----
    row("request-tile-size-zero", "request", lambda t: run_argv(t, "--tile", "0", "0"), "$.tile_size:"),
    row(
        "request-tile-size-negative", "request", lambda t: run_argv(t, "--tile", "-64", "64"), "$.tile_size:"
    ),
    row(
        "request-tile-size-over-the-limit",
        "request",
        lambda t: run_argv(t, "--tile", "16385", "16385"),
        "$.tile_size: must be [width, height] (or one number), whole numbers 1..16384",
    ),
    row(
        "request-tile-size-16384",
        "request",
        lambda t: run_argv(
            t, "--tile", "16384", "16384", model=onnx_file(t, contract_model(height="H", width="W"), "anyhw")
        ),
        # No --batch: on a CPU the runner takes one tile this large per call, and even one is too large.
        "a batch of 1 tile of 16384x16384x3 float32 is 3,072 MiB, over the 512 MiB",
        memory_cap=True,
    ),
    row(
        "request-tile-size-not-a-number",
        "request",
        lambda t: run_argv(t, "--tile", "512px", "512"),
        "argument --tile: invalid int value: '512px'",
    ),
    row("request-overlap-negative", "request", lambda t: run_argv(t, "--overlap", "-8"), "$.overlap:"),
    row(
        "request-overlap-not-below-the-tile",
        "request",
        lambda t: run_argv(t, "--tile", "64", "64", "--overlap", "64"),
        "$.overlap: must be smaller than the tile (64 x 64)",
    ),
    row(
        "request-overlap-not-below-the-models-tile",
        "request",
        lambda t: run_argv(t, "--overlap", "96"),
        "overlap (96, 96) must be smaller than the tile (64 x 64)",
    ),
    row(
        "request-overlap-of-three-values",
        "request",
        lambda t: run_argv(t, "--overlap", "8", "8", "8"),
        "--overlap",
    ),
    row("request-region-size-zero", "request", lambda t: run_argv(t, "--region", "0"), "$.region_size:"),
    row(
        "request-batch-size-zero",
        "request",
        lambda t: run_argv(t, "--batch", "0"),
        "$.batch_size: must be a whole number 1..256",
    ),
    row(
        "request-batch-size-absurd",
        "request",
        lambda t: run_argv(t, "--batch", "100000"),
        "$.batch_size: must be a whole number 1..256, got the number 100000",
    ),
    row(
        "request-score-above-one",
        "request",
        lambda t: run_argv(t, "--score", "25"),
        "$.merge.score_threshold: must be a number 0..1",
    ),
    row(
        "request-score-nan",
        "request",
        lambda t: run_argv(t, "--score", "nan"),
        "$.merge.score_threshold: must be a number 0..1, got the number nan",
    ),
    row("request-iou-negative", "request", lambda t: run_argv(t, "--iou", "-0.5"), "$.merge.iou:"),
    row("request-ios-above-one", "request", lambda t: run_argv(t, "--ios", "1.5"), "$.merge.ios:"),
    row(
        "request-unknown-merge-algorithm",
        "request",
        lambda t: run_argv(t, "--merge", "wbf"),
        "argument --merge: invalid choice: 'wbf'",
    ),
    row(
        "request-scaling-rule-not-a-rule",
        "request",
        lambda t: run_argv(t, "--scale", "auto"),
        "must be 'low,high', e.g. '0,4095'",
    ),
    row(
        "request-scaling-range-inverted",
        "request",
        lambda t: run_argv(t, "--scale", "4095,0"),
        "must have high > low",
    ),
    row(
        "request-job-id-path-traversal",
        "request",
        lambda t: run_argv(t, "--job-id", "../../etc/cron.d/x"),
        "$.job_id: must be 1-128 letters",
    ),
    row("request-job-id-too-long", "request", lambda t: run_argv(t, "--job-id", "j" * 129), "$.job_id:"),
    row(
        "request-property-without-a-value",
        "request",
        lambda t: run_argv(t, "--property", "mission"),
        "--property 'mission': write it as KEY=VALUE",
    ),
    row(
        "request-property-reserved-name",
        "request",
        lambda t: run_argv(t, "--property", "score=1"),
        "$.properties.score: is written by the model runner",
    ),
    row(
        "request-without-a-model",
        "request",
        lambda t: ["run", str(scene(t)), "--out", str(out_path(t))],
        "the following arguments are required: --model",
    ),
    row(
        "request-unknown-provider",
        "request",
        lambda t: run_argv(t, "--providers", "tpu"),
        "argument --providers: invalid choice: 'tpu'",
    ),
    # ---- regions of interest ----
    row(
        "roi-file-missing",
        "roi",
        lambda t: run_argv(t, "--roi", t / "harbour.geojson"),
        "cannot read the region of interest",
    ),
    row(
        "roi-is-a-directory",
        "roi",
        lambda t: run_argv(t, "--roi", _directory(t, "rois")),
        "cannot read the region of interest",
    ),
    row("roi-empty-file", "roi", lambda t: _roi_text(t, ""), "$.roi.geometry: must be GeoJSON or WKT"),
    row(
        "roi-not-utf8",
        "roi",
        lambda t: _roi_text(t, b"\xff\xfePOLYGON"),
        "region of interest",
    ),
    row("roi-not-json", "roi", lambda t: _roi_text(t, '{"type": "Polygon",'), "is not valid JSON"),
    row("roi-json-list", "roi", lambda t: _roi_text(t, "[[15.0, 45.1]]"), "neither GeoJSON nor valid WKT"),
    row(
        "roi-wkt-garbage",
        "roi",
        lambda t: _roi_text(t, "POLYGON ((15 45, 16"),
        "neither GeoJSON nor valid WKT",
    ),
    row(
        "roi-unknown-geojson-type",
        "roi",
        lambda t: _roi(t, {"type": "Circle", "center": [15.0, 45.15], "radius": 10}),
        "is not a valid GeoJSON geometry",
    ),
    row(
        "roi-feature-without-geometry",
        "roi",
        lambda t: _roi(t, {"type": "Feature", "properties": {}, "geometry": None}),
        "a Feature without a geometry",
    ),
    row(
        "roi-empty-feature-collection",
        "roi",
        lambda t: _roi(t, {"type": "FeatureCollection", "features": []}),
        "a FeatureCollection with no features",
    ),
    row(
        "roi-empty-geometry",
        "roi",
        lambda t: _roi_text(t, "POLYGON EMPTY"),
        "must be a polygon or multipolygon with an area",
    ),
    row(
        "roi-a-point",
        "roi",
        lambda t: _roi(t, {"type": "Point", "coordinates": [15.0004, 45.1532]}),
        "must be a polygon or multipolygon with an area",
    ),
    row(
        "roi-ring-of-two-points",
        "roi",
        lambda t: _roi(t, {"type": "Polygon", "coordinates": [[[15.0, 45.15], [15.001, 45.153]]]}),
        "is not a valid GeoJSON geometry",
    ),
    row(
        "roi-self-intersecting-polygon",
        "roi",
        lambda t: _roi_text(
            t,
            "POLYGON ((15.0001 45.1530, 15.0006 45.1534, 15.0006 45.1530, 15.0001 45.1534, 15.0001 45.1530))",
        ),
        "must be a polygon or multipolygon with an area",
    ),
    row(
        "roi-nan-coordinates",
        "roi",
        lambda t: _roi_text(
            t, '{"type": "Polygon", "coordinates": [[[NaN, 45], [16, 45], [16, 46], [NaN, 45]]]}'
        ),
        "is not a valid GeoJSON geometry",
    ),
    row(
        "roi-map-coordinates-said-to-be-lonlat",
        "roi",
        lambda t: _roi(t, polygon([[[500_010, 4_999_990], [500_050, 4_999_990], [500_050, 4_999_950]]])),
        "is not in longitude/latitude",
    ),
    row(
        "roi-lonlat-said-to-be-map-coordinates",
        "roi",
        lambda t: _roi(t, polygon([LONLAT_INSIDE]), "--roi-crs", "map"),
        "the region of interest does not overlap the image",
    ),
    row(
        "roi-outside-the-image",
        "roi",
        lambda t: _roi(t, polygon([[[16.0, 46.0], [16.1, 46.0], [16.1, 46.1], [16.0, 46.1]]])),
        "the region of interest does not overlap the image",
    ),
    row(
        "roi-outside-the-images-projection",
        "roi",
        lambda t: _roi(t, polygon([[[104.0, -1.0], [106.0, -1.0], [106.0, 1.0], [104.0, 1.0]]])),
        "cannot be projected to the image's CRS",
    ),
    row(
        "roi-lonlat-on-an-image-without-a-crs",
        "roi",
        lambda t: run_argv(t, "--roi", geojson(t, polygon([LONLAT_INSIDE])), image=scene(t, crs=None)),
        "the image has no CRS",
    ),
    row(
        "roi-unknown-coordinates",
        "roi",
        lambda t: _roi(t, polygon([LONLAT_INSIDE]), "--roi-crs", "utm"),
        "argument --roi-crs: invalid choice: 'utm'",
    ),
    # ---- outputs ----
    row(
        "output-under-a-file",
        "output",
        lambda t: run_argv(t, out=file_of(t, "report.pdf", b"%PDF-1.7") / "result.geojson"),
        "cannot write the output",
    ),
    row(
        "output-is-a-directory",
        "output",
        lambda t: run_argv(t, out=out_dir(t)),
        "is a directory; give the path of the .geojson file",
    ),
    row(
        "output-directory-cannot-be-made",
        "output",
        lambda t: run_argv(t, out="/proc/tessera-no-such-dir/result.geojson"),
        "cannot write the output /proc/tessera-no-such-dir/result.geojson",
    ),
    row(
        "output-directory-not-writable",
        "output",
        _not_writable,
        "cannot write the output",
        marks=[AS_ROOT],
    ),
    row(
        "output-not-geojson",
        "output",
        lambda t: run_argv(t, out=out_dir(t) / "result.tif"),
        ".geojson",
    ),
    row(
        "output-over-the-input-image",
        "output",
        lambda t: run_argv(t, out=scene(t)),
        "image",
    ),
    row(
        "output-http-url",
        "output",
        lambda t: run_argv(t, out="https://results.example/run.geojson"),
        "https://",
    ),
    row("output-empty", "output", lambda t: run_argv(t, out=""), "$.outputs.path: must be a file path"),
    row(
        "output-path-with-a-newline",
        "output",
        lambda t: run_argv(t, out=f"{out_path(t)}\n.geojson"),
        "$.outputs.path: the output path holds a control character",
    ),
    row("output-s3-without-a-bucket", "output", lambda t: run_argv(t, out="s3://"), "names no bucket"),
    row(
        "output-s3-bad-bucket-name",
        "output",
        lambda t: run_argv(t, out="s3://My_Results/runs"),
        "$.outputs.s3: 's3://My_Results/runs' names no bucket",
    ),
    row(
        "output-s3-dot-dot",
        "output",
        lambda t: run_argv(t, out="s3://results/runs/../../audit"),
        "has a '.' or '..' segment",
    ),
    row(
        "output-s3-query-string",
        "output",
        lambda t: run_argv(t, out="s3://results/runs?versionId=1"),
        "(URL tricks)",
    ),
    row(
        "output-s3-without-credentials",
        "output",
        lambda t: run_argv(t, out="s3://results/runs"),
        "no AWS credentials to write the output s3://results/runs/",
    ),
    # ---- request documents, as a queue worker checks them (parse_request, confined policy) ----
    row(
        "queue-not-json", "request", lambda t: b'{"image": "s3://imagery/a.tif",', "is not JSON", via="queue"
    ),
    row(
        "queue-not-an-object",
        "request",
        lambda t: '["s3://imagery/a.tif"]',
        "$: the image request must be a JSON object",
        via="queue",
    ),
    row(
        "queue-unknown-schema",
        "request",
        lambda t: queued(t, schema="tessera.image-request/v2"),
        "$.schema: unsupported schema 'tessera.image-request/v2'",
        via="queue",
    ),
    row(
        "queue-unknown-field",
        "request",
        lambda t: queued(t, tile=512),
        "$.tile: unknown field",
        via="queue",
    ),
    row(
        "queue-without-an-image",
        "request",
        lambda t: queued(t, drop=["image"]),
        "$.image: required",
        via="queue",
    ),
    row(
        "queue-without-outputs",
        "request",
        lambda t: queued(t, drop=["outputs"]),
        "$.outputs: required",
        via="queue",
    ),
    row("queue-job-id-a-number", "request", lambda t: queued(t, job_id=42), "$.job_id:", via="queue"),
    row(
        "queue-tile-size-a-string",
        "request",
        lambda t: queued(t, tile_size="512"),
        "$.tile_size: must be [width, height]",
        via="queue",
    ),
    row(
        "queue-batch-size-a-boolean",
        "request",
        lambda t: queued(t, batch_size=True),
        "$.batch_size: must be a whole number 1..256, got a boolean",
        via="queue",
    ),
    row(
        "queue-unknown-merge-algorithm",
        "request",
        lambda t: queued(t, merge={"algorithm": "wbf"}),
        "$.merge.algorithm: must be one of nms+ios, nms",
        via="queue",
    ),
    row(
        "queue-unknown-scaling-mode",
        "request",
        lambda t: queued(t, scaling={"mode": "log"}),
        "$.scaling: scaling mode must be one of",
        via="queue",
    ),
    row(
        "queue-model-and-endpoint",
        "model",
        lambda t: queued(t, endpoint={"url": "http://detector:8080/invocations", "tile_size": 512}),
        "$.model: give either model or endpoint, not both",
        via="queue",
    ),
    row(
        "queue-endpoint-not-allowed",
        "model",
        lambda t: queued(
            t, drop=["model"], endpoint={"url": "http://169.254.169.254/latest", "tile_size": 512}
        ),
        "$.endpoint.url: 'http://169.254.169.254/latest' is not a model endpoint this deployment allows",
        via="queue",
    ),
    row(
        "queue-image-bucket-not-allowed",
        "image",
        lambda t: queued(t, image="s3://someone-elses-bucket/scene.tif"),
        "$.image: bucket 'someone-elses-bucket' is not one this deployment reads or writes",
        via="queue",
    ),
    row(
        "queue-image-outside-the-local-root",
        "image",
        lambda t: queued(t, image="/etc/shadow"),
        "$.image: the image '/etc/shadow' is not under",
        via="queue",
    ),
    row(
        "queue-image-gdal-virtual-path",
        "image",
        lambda t: queued(t, image="/vsicurl/http://169.254.169.254/latest/meta-data/"),
        "$.image: the image '/vsicurl/http://169.254.169.254/latest/meta-data/' is a GDAL virtual path",
        via="queue",
    ),
    row(
        "queue-output-path-dot-dot",
        "output",
        lambda t: queued(t, outputs={"path": "../../root/.ssh/authorized_keys"}),
        "$.outputs.path: the output path '../../root/.ssh/authorized_keys' has a '..' segment",
        via="queue",
    ),
    row(
        "queue-output-path-not-geojson",
        "output",
        lambda t: queued(t, outputs={"path": "runs/result.sh"}),
        "$.outputs.path: 'runs/result.sh' must name a .geojson file",
        via="queue",
    ),
    row(
        "queue-output-through-a-symlink",
        "output",
        _symlink_out_of_root,
        "$.outputs.path: the output path 'link/result.geojson' is not under",
        via="queue",
    ),
    row(
        "queue-output-bucket-not-allowed",
        "output",
        lambda t: queued(t, outputs={"s3": "s3://exfiltrate/runs"}),
        "$.outputs.s3: bucket 'exfiltrate' is not one this deployment reads or writes",
        via="queue",
    ),
    row(
        "queue-reserved-property",
        "request",
        lambda t: queued(t, properties={"class": "ship"}),
        "$.properties.class: is written by the model runner",
        via="queue",
    ),
]

#: The ``tessera run:`` line and, for the request checker, its headline's count of ``$.path:`` lines.
_HEADLINE = re.compile(r"has (a problem|(\d+) problems):$")
_PROBLEM = re.compile(r"^  \$\S*: ")
#: Credentials and endpoints that would let a row reach a real AWS account or a database.
_AMBIENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "TESSERA_DB_URL",
    "TESSERA_MAX_BATCH_MB",
)


def _rows() -> list[Bad]:
    return [param.values[0] for param in CORPUS]


def _tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root``: a file's size and modification time, None for a directory."""
    seen: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            seen[str(Path(folder, name).relative_to(root))] = None
        for name in files:
            info = Path(folder, name).lstat()
            seen[str(Path(folder, name).relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return seen


def _fresh_home() -> str:
    """A $TESSERA_HOME of its own, removed when the tests end (outside pytest's private temporary
    directories: the embedded PostgreSQL runs as its own user when tests run as root)."""
    path = tempfile.mkdtemp(prefix="tessera-corpus-home-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    for name in _AMBIENT:
        monkeypatch.delenv(name, raising=False)
    missing = str(tmp / "no-such-aws-config")
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "CPL_AWS_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, missing)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # The local registry of a run without a database: a fresh one, never the user's own.
    monkeypatch.setenv("TESSERA_HOME", _fresh_home())
    # boto3's default session caches the credentials it found first (another test's, say).
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@contextmanager
def _address_space_cap(headroom: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``headroom`` for the block."""
    import resource

    status = Path("/proc/self/status").read_text(encoding="ascii")
    found = re.search(r"^VmSize:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None, "no VmSize in /proc/self/status"
    size = int(found.group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom if hard == resource.RLIM_INFINITY else min(size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _tessera(argv: Sequence[str]) -> int:
    """``tessera ARGV`` in this process: its exit status (argparse's refusals exit)."""
    try:
        return main(list(argv))
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1


def the_message(err: str) -> str:
    """The one message on stderr: the only ``tessera run:`` line and, after a request checker's headline,
    exactly its problem lines; nothing may follow it. (Before it: the progress bar, argparse's usage.)"""
    lines = err.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("tessera run:")]
    assert len(heads) == 1, f"want one 'tessera run:' line on stderr, got {len(heads)}:\n{err}"
    head, *rest = lines[heads[0] :]
    listed = _HEADLINE.search(head)
    count = 0 if listed is None else 1 if listed.group(2) is None else int(listed.group(2))
    assert len(rest) == count and all(_PROBLEM.match(line) for line in rest), (
        f"after {head!r} want {count} '  $.path: ...' lines and nothing else:\n{err}"
    )
    return "\n".join([head, *rest])


@pytest.mark.parametrize("bad", CORPUS)
def test_a_bad_input_is_refused_in_one_clear_message(
    bad: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_ambient_credentials(monkeypatch, tmp_path)
    out_dir(tmp_path).mkdir()
    case = bad.build(tmp_path)
    before = _tree(tmp_path)
    if bad.via == "queue":
        assert isinstance(case, str | bytes | Mapping)
        with pytest.raises(UserError) as refused:
            parse_request(case, policy=queue_policy(tmp_path))
        assert bad.says in str(refused.value)
    else:
        assert not isinstance(case, str | bytes | Mapping)
        monkeypatch.chdir(tmp_path)  # a relative output lands here, where the tree check sees it
        with _address_space_cap(MEMORY_HEADROOM) if bad.memory_cap else nullcontext():
            status = _tessera(case)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        assert status == 2, f"exit status {status}; stderr:\n{captured.err}"
        assert bad.says in the_message(captured.err)
        assert captured.out == ""
    after = _tree(tmp_path)
    assert [p for p in after if p.startswith("out/")] == [p for p in before if p.startswith("out/")]
    assert after == before, "the run left or changed files"


def test_the_corpus_holds_forty_kinds_with_unique_ids() -> None:
    rows = _rows()
    ids = [bad.id for bad in rows]
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    assert len(ids) >= 40
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids), ids
    assert {bad.group for bad in rows} == set(GROUPS)
    assert {bad.via for bad in rows} == {"run", "queue"}
    assert sum(bad.via == "queue" for bad in rows) >= 6
    assert all(bad.says for bad in rows)
