"""Builders for the bad-input corpus (test_bad_input_corpus.py): small real inputs written under a test's
``tmp_path`` — GeoTIFFs (rasterio, via square_world), ONNX models (onnx.helper, via tests/inference's
onnx_builders), region-of-interest files — and the ``tessera run`` argv or queued request document that
hands them to the model runner.

Every builder writes only under the ``tmp`` it is given, so a row's inputs never outlive its test.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import rasterio
from rasterio.transform import Affine

_TESTS = Path(__file__).resolve().parent.parent
# pytest puts a test directory on sys.path only when it collects it: make tests/inference's builders (and
# tests/, which they import from) importable when this directory's tests run on their own.
for _folder in (_TESTS, _TESTS / "inference"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

from onnx_builders import CLASS_NAMES, save  # noqa: E402
from square_world import build_square_detector, place_squares, write_raster  # noqa: E402

from services.jobs.trust import TrustPolicy  # noqa: E402

#: The shipped demo detector (512 px tiles): the real ONNX file the truncated-model row cuts in half.
DEMO_MODEL = _TESTS.parent / "services" / "models" / "tessera-demo-detector.onnx"
#: The scene's georeferencing: UTM zone 33N, 0.5 m pixels, top-left at (500000, 5000000), i.e. near
#: lon 15.0, lat 45.1.
CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0)
#: A lon/lat square inside the 128 px scene (which spans lon 15.0000..15.0008, lat 45.1529..45.1535).
LONLAT_INSIDE = [[15.0001, 45.1534], [15.0006, 45.1534], [15.0006, 45.1530], [15.0001, 45.1530]]
#: Buckets the queue policy of the queued rows allows.
QUEUE_BUCKETS = frozenset({"imagery", "models", "results"})


def out_dir(tmp: Path) -> Path:
    """The output directory of a row (the harness makes it, empty, before building)."""
    return tmp / "out"


def out_path(tmp: Path) -> Path:
    """Where a row's GeoJSON would go."""
    return out_dir(tmp) / "result.geojson"


def square_model(tmp: Path) -> Path:
    """The square detector (64 px tiles, 3 channels, uint8 / 255), written once per test."""
    path = tmp / "models" / "squares.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_square_detector(path)
    return path


def scene(
    tmp: Path, *, size: int = 128, bands: int = 3, crs: str | None = CRS, name: str = "scene.tif"
) -> Path:
    """A uint8 GeoTIFF of ``size`` px holding three bright squares the square detector finds."""
    path = tmp / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    squares = place_squares(size, size, seed=1, count=3) if size >= 64 else np.zeros((0, 4), np.float32)
    return write_raster(path, squares, size, size, bands=bands, crs=crs, transform=TRANSFORM)  # type: ignore[arg-type]


def raster(tmp: Path, pixels: np.ndarray, *, name: str, nodata: float | None = None) -> Path:
    """A GeoTIFF of ``pixels`` ``[bands, rows, cols]`` in their own dtype (complex, float, signed...)."""
    path = tmp / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = pixels.shape
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": str(pixels.dtype),
        "crs": CRS,
        "transform": TRANSFORM,
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as out:
        out.write(pixels)
    return path


def file_of(tmp: Path, name: str, content: str | bytes) -> Path:
    """A file of ``content`` at ``tmp/inputs/name``."""
    path = tmp / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def onnx_file(
    tmp: Path, model: onnx.ModelProto, name: str, metadata: Mapping[str, str] | None = None
) -> Path:
    """``model`` saved as ``tmp/models/name.onnx``, its class names (and ``metadata``) in its metadata."""
    path = tmp / "models" / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(model, path, {"tessera.class_names": json.dumps(CLASS_NAMES), **(metadata or {})})


def geojson(tmp: Path, document: Any, name: str = "roi.geojson") -> Path:
    """A region-of-interest file holding ``document`` as JSON."""
    return file_of(tmp, name, json.dumps(document))


def polygon(rings: Sequence[Sequence[Sequence[float]]]) -> dict[str, Any]:
    """A GeoJSON Polygon of ``rings`` (each closed here)."""
    return {"type": "Polygon", "coordinates": [[*map(list, ring), list(ring[0])] for ring in rings]}


def run_argv(
    tmp: Path,
    *extra: str | Path,
    image: str | Path | None = None,
    model: str | Path | None = None,
    out: str | Path | None = None,
) -> list[str]:
    """``tessera run IMAGE --model MODEL --out OUT [extra...]``; what is not given is good (the square scene
    and detector, ``out/result.geojson``)."""
    argv = [
        "run",
        str(scene(tmp) if image is None else image),
        "--model",
        str(square_model(tmp) if model is None else model),
        "--out",
        str(out_path(tmp) if out is None else out),
    ]
    return argv + [str(e) for e in extra]


def queue_policy(tmp: Path) -> TrustPolicy:
    """A queue worker's policy: the rows' buckets, local reads under ``tmp/in``, writes under ``tmp/out``."""
    return TrustPolicy(
        confined=True,
        allowed_buckets=QUEUE_BUCKETS,
        local_root=(tmp / "in").resolve(),
        output_root=out_dir(tmp).resolve(),
    )


def queued(tmp: Path, *, drop: Sequence[str] = (), **fields: Any) -> dict[str, Any]:
    """A request document a queue worker would accept, with ``fields`` replaced and ``drop`` removed."""
    document: dict[str, Any] = {
        "schema": "tessera.image-request/v1",
        "job_id": "harbour-1",
        "image": "s3://imagery/harbour.tif",
        "model": "s3://models/ships.onnx",
        "outputs": {"s3": "s3://results/runs"},
    }
    document.update(fields)
    for key in drop:
        document.pop(key, None)
    return document
