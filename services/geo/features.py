"""Detections as RFC 7946 GeoJSON: pixel boxes -> map coordinates -> lon/lat polygons, streamed out.

A box ``(x1, y1, x2, y2)`` is in image pixels, ``(0, 0)`` being the top-left corner of the top-left
pixel. Its four corners go through the raster's affine transform to map coordinates, then through
``rasterio.warp.transform`` to longitude/latitude (EPSG:4326, longitude first), all as arrays. Each box
becomes a closed 5-point Polygon ring wound counter-clockwise (RFC 7946's right-hand rule), whatever the
transform's orientation. Coordinates are written with 7 decimals (about 1 cm), scores with 4, pixel boxes
with 2. The output is always valid JSON: a NaN or infinite score or pixel coordinate is refused
(:class:`NonFiniteError`, nothing of that chunk written), never written as ``nan`` (detections are checked
where they leave the model, services/inference/detections.py ``check_boxes``, so this is a last guard).

An image without a CRS cannot be placed on the Earth: its features get ``"geometry": null`` (allowed by
RFC 7946) and keep ``pixel_bbox``. A box whose corners cannot be projected also gets a null geometry.
Boxes crossing the antimeridian are not split.

:class:`FeatureWriter` writes one FeatureCollection to a binary stream, formatting features in chunks
(``chunk_size``), so a million detections never become a million Python dictionaries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import numpy as np
import rasterio.crs
import rasterio.warp

from services.errors import UserError

LONLAT = rasterio.crs.CRS.from_epsg(4326)
RESERVED_PROPERTIES = ("class", "score", "pixel_bbox", "model", "job")
COORDINATE_DECIMALS = 7
SCORE_DECIMALS = 4
PIXEL_DECIMALS = 2


class NonFiniteError(ValueError):
    """Detections hold a NaN or infinite number, which JSON cannot carry."""


class DetectionColumns(Protocol):
    """Anything with detection columns: ``boxes [N, 4]``, ``scores [N]``, ``labels [N]``."""

    @property
    def boxes(self) -> np.ndarray: ...

    @property
    def scores(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...


def pixel_to_map(cols: np.ndarray, rows: np.ndarray, transform: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates to map coordinates through an affine transform (arrays of any shape)."""
    cols = np.asarray(cols, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    return xs, ys


def box_rings(boxes: np.ndarray, transform: Any, crs: Any) -> np.ndarray:
    """Closed lon/lat rings ``[N, 5, 2]`` (float64, counter-clockwise) for pixel boxes ``[N, 4]``.

    Corners that cannot be projected come out as non-finite numbers.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = boxes.T
    # Four corners projected; the ring is closed afterwards, which saves a fifth of the projection work.
    cols = np.stack([x1, x2, x2, x1], axis=1)
    rows = np.stack([y1, y1, y2, y2], axis=1)
    xs, ys = pixel_to_map(cols, rows, transform)
    if rasterio.crs.CRS.from_user_input(crs) != LONLAT:
        lons, lats = rasterio.warp.transform(crs, LONLAT, xs.ravel(), ys.ravel())
        xs = np.asarray(lons, dtype=np.float64).reshape(xs.shape)
        ys = np.asarray(lats, dtype=np.float64).reshape(ys.shape)
    xs = np.concatenate([xs, xs[:, :1]], axis=1)
    ys = np.concatenate([ys, ys[:, :1]], axis=1)
    rings = np.stack([xs, ys], axis=2)
    # Shoelace: a negative signed area is a clockwise ring, so reverse it.
    area = np.sum(xs[:, :-1] * ys[:, 1:] - xs[:, 1:] * ys[:, :-1], axis=1)
    clockwise = area < 0
    rings[clockwise] = rings[clockwise, ::-1]
    return rings


_RING = ",".join([f"[%.{COORDINATE_DECIMALS}f,%.{COORDINATE_DECIMALS}f]"] * 5)
_POLYGON = '{"type":"Polygon","coordinates":[[' + _RING + "]]}"
_PROPERTIES = '"properties":{"class":%s,"score":%.' + str(SCORE_DECIMALS) + 'f,"pixel_bbox":['
_PROPERTIES += ",".join([f"%.{PIXEL_DECIMALS}f"] * 4) + "]"


class FeatureWriter:
    """Streams detections as one GeoJSON FeatureCollection to a binary file object.

    Call :meth:`write` (arrays) or :meth:`write_detections` any number of times, then :meth:`close`
    (or use it as a context manager), which ends the collection; the stream itself stays open.
    Properties of each feature: ``class`` (name; ``class_<label>`` past the known names), ``score``,
    ``pixel_bbox`` ``[x1, y1, x2, y2]``, ``model``, ``job``, then ``properties`` (the request's extras;
    they may not reuse those names).
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        transform: Any,
        crs: Any,
        class_names: Sequence[str],
        model: str,
        job: str,
        properties: Mapping[str, Any] | None = None,
        chunk_size: int = 10_000,
    ) -> None:
        extra = dict(properties or {})
        clash = sorted(set(extra) & set(RESERVED_PROPERTIES))
        if clash:
            raise UserError(
                f"extra feature properties may not be named {clash}: those names are set by tessera"
            )
        try:
            shared = json.dumps({"model": model, "job": job, **extra}, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise UserError(f"extra feature properties must be plain JSON values: {error}") from error
        # model, job and the extras are the same on every feature: baked into the templates once.
        tail = ("," + shared[1:-1] + "}}").replace("%", "%%")
        self._with_geometry = '{"type":"Feature","geometry":' + _POLYGON + "," + _PROPERTIES + tail
        self._without_geometry = '{"type":"Feature","geometry":null,' + _PROPERTIES + tail
        self._stream = stream
        self._transform = transform
        self._crs = crs
        self._names = [json.dumps(str(name)) for name in class_names]
        self._chunk_size = max(1, chunk_size)
        self._closed = False
        self.count = 0
        stream.write(b'{"type":"FeatureCollection","features":[\n')

    def write(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Append features for pixel ``boxes [N, 4]``, ``scores [N]`` and integer ``labels [N]``."""
        if self._closed:
            raise ValueError("the feature collection is already closed")
        boxes = np.asarray(boxes).reshape(-1, 4)
        scores = np.asarray(scores).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"boxes, scores and labels differ in length: {len(boxes)}, {len(scores)}, {len(labels)}"
            )
        for start in range(0, len(boxes), self._chunk_size):
            end = start + self._chunk_size
            self._write_chunk(boxes[start:end], scores[start:end], labels[start:end])

    def write_detections(self, detections: DetectionColumns) -> None:
        """Append features for a detections object (columns ``boxes``, ``scores``, ``labels``)."""
        self.write(detections.boxes, detections.scores, detections.labels)

    def _write_chunk(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        count = len(boxes)
        if count == 0:
            return
        bad = ~(np.isfinite(scores.astype(np.float64)) & np.isfinite(boxes.astype(np.float64)).all(axis=1))
        if bad.any():
            raise NonFiniteError(
                f"{int(bad.sum())} detection(s) hold a NaN or infinite score or pixel coordinate, which JSON "
                f"cannot carry (the first: box {boxes[bad][0].tolist()}, score {scores[bad][0].item()})"
            )
        # One row of template arguments per feature: ring (10), class, score, pixel box (4).
        columns = np.empty((count, 16), dtype=object)
        columns[:, 10] = self._class_names(labels.astype(np.int64))
        columns[:, 11] = scores.astype(np.float64)
        columns[:, 12:] = boxes.astype(np.float64)
        if self._crs is None:
            finite = np.zeros(count, dtype=bool)
        else:
            rings = box_rings(boxes, self._transform, self._crs).reshape(count, 10)
            finite = np.all(np.isfinite(rings), axis=1)
            columns[:, :10] = np.where(finite[:, None], rings, 0.0)
        if finite.all():
            # One formatting call per chunk: far faster than one per feature.
            text = ((self._with_geometry + ",\n") * count) % tuple(columns.ravel().tolist())
            text = text[:-2]
        elif not finite.any():
            text = ((self._without_geometry + ",\n") * count) % tuple(columns[:, 10:].ravel().tolist())
            text = text[:-2]
        else:
            text = ",\n".join(
                self._with_geometry % tuple(row) if ok else self._without_geometry % tuple(row[10:])
                for row, ok in zip(columns.tolist(), finite.tolist(), strict=True)
            )
        self._stream.write(((",\n" if self.count else "") + text).encode("utf-8"))
        self.count += count

    def _class_names(self, labels: np.ndarray) -> list[str]:
        known = len(self._names)
        table = np.array([*self._names, ""], dtype=object)
        names = table[np.clip(labels, 0, known)]
        unknown = (labels < 0) | (labels >= known)
        if unknown.any():
            names[unknown] = [json.dumps(f"class_{label}") for label in labels[unknown].tolist()]
        result: list[str] = names.tolist()
        return result

    def close(self) -> None:
        """End the FeatureCollection (idempotent); the stream stays open for its owner."""
        if not self._closed:
            self._stream.write(b"\n]}\n")
            self._closed = True

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
