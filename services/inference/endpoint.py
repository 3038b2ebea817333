"""Models served elsewhere, over the OSML / SageMaker ``POST /invocations`` contract; and a tiny server.

The request body is one tile as an image (PNG, or TIFF; 8-bit, 1, 3 or 4 bands). The response is a GeoJSON
FeatureCollection of "unlocated" features (``geometry`` null) whose properties carry, in tile pixels:

- the box: ``imageBBox`` ``[x1, y1, x2, y2]`` (also ``bounds_imcoords``, the older OSML name, or the bounds
  of ``imageGeometry``);
- the class and score: ``featureClasses`` ``[{"iri": name, "score": s}, ...]`` (the best entry is taken;
  also ``feature_types`` as such a list or as ``{name: score}``), or ``class`` / ``label`` and ``score``
  / ``detection_score``.

:class:`EndpointDetector` is a detector (same interface as ``OnnxDetector``) that sends each tile to such an
endpoint; :func:`endpoint_server` / :func:`serve_endpoint` stand any detector up behind ``GET /ping`` and
``POST /invocations`` (standard library HTTP server), so a local model can be served the same way. Only
the standard library, NumPy and Pillow are used.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from services.errors import UserError
from services.inference.detections import Detections
from services.inference.detector import Detector

log = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_FORMATS = {"png": ("PNG", "image/png"), "tiff": ("TIFF", "image/tiff")}


class EndpointUnavailableError(UserError):
    """The endpoint kept failing (5xx or no connection) after every retry."""


class EndpointDetector:
    """A detector behind ``<url>/invocations`` (see the module docstring for the wire format).

    Tiles (float32 ``[B, C, H, W]`` scaled to [0, 1]) are sent as 8-bit images, ``concurrency`` at a time.
    5xx answers and connection errors are retried ``retries`` times with exponential backoff from
    ``backoff_s``; a 4xx answer or a malformed response is a UserError. Class names met in responses are
    appended to ``class_names`` (labels index it).
    """

    provider = "endpoint"

    def __init__(
        self,
        url: str,
        *,
        tile_width: int,
        tile_height: int,
        channels: int = 3,
        class_names: Sequence[str] | None = None,
        timeout_s: float = 30,
        retries: int = 3,
        encoding: str = "png",
        score_threshold: float = 0.0,
        batch_size: int = 8,
        concurrency: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        if channels not in _MODES:
            raise UserError(f"an endpoint takes 1, 3 or 4 band tiles, not {channels}")
        if encoding not in _FORMATS:
            raise UserError(f"unknown tile encoding {encoding!r}; use one of {', '.join(_FORMATS)}")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"endpoint URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.name = self.url
        self.tile_width = int(tile_width)
        self.tile_height = int(tile_height)
        self.channels = int(channels)
        self.class_names: list[str] = list(class_names or [])
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.encoding = encoding
        self.score_threshold = float(score_threshold)
        self.batch_size = int(batch_size)
        self.concurrency = max(1, int(concurrency))
        self.backoff_s = float(backoff_s)
        self._names_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EndpointDetector({self.url!r}, {self.channels}x{self.tile_height}x{self.tile_width})"

    def class_name(self, label: int) -> str:
        """The class name of ``label``, or the label as text when unknown."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def detect(self, pixels: np.ndarray) -> list[Detections]:
        """Detections in tile pixels, one per tile of ``pixels`` float32 ``[B, C, H, W]``."""
        pixels = np.asarray(pixels)
        expected = (self.channels, self.tile_height, self.tile_width)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise UserError(
                f"endpoint {self.url} takes tiles [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(pixels.shape)}"
            )
        if pixels.shape[0] == 0:
            return []
        if self.concurrency == 1 or pixels.shape[0] == 1:
            return [self._detect_tile(tile) for tile in pixels]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, pixels.shape[0])) as pool:
            return list(pool.map(self._detect_tile, pixels))

    def ping(self) -> bool:
        """Whether ``GET <url>/ping`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=min(self.timeout_s, 5)) as r:
                return bool(r.status == 200)
        except (OSError, http.client.HTTPException):
            return False

    def _detect_tile(self, tile: np.ndarray) -> Detections:
        body = encode_tile(tile, self.encoding)
        doc = self._post(body)
        d = parse_features(doc, self._label_of, source=self.url)
        return d.above(self.score_threshold) if self.score_threshold > 0 else d

    def _post(self, body: bytes) -> Any:
        fmt, content_type = _FORMATS[self.encoding]
        url = f"{self.url}/invocations"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(
                url,
                data=body,
                method="POST",
                headers={"Content-Type": content_type, "Accept": "application/geo+json, application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                detail = _excerpt(exc.read())
                if exc.code >= 500 or exc.code == 429:
                    last = f"HTTP {exc.code} {detail}"
                    log.warning("endpoint %s answered %s (attempt %d)", url, last, attempt + 1)
                    continue
                raise UserError(f"endpoint {url} refused the tile ({fmt}): HTTP {exc.code} {detail}") from exc
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                last = f"{type(exc).__name__}: {exc}"
                log.warning("endpoint %s failed: %s (attempt %d)", url, last, attempt + 1)
                continue
            try:
                return json.loads(payload)
            except ValueError as exc:
                raise UserError(
                    f"endpoint {url} answered something that is not JSON: {_excerpt(payload)}"
                ) from exc
        raise EndpointUnavailableError(f"endpoint {url} failed {self.retries + 1} times; last: {last}")

    def _label_of(self, name: str | int) -> int:
        if isinstance(name, int):
            return name
        with self._names_lock:
            if name in self.class_names:
                return self.class_names.index(name)
            short = name.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]
            if short in self.class_names:
                return self.class_names.index(short)
            self.class_names.append(name)
            return len(self.class_names) - 1


def encode_tile(tile: np.ndarray, encoding: str = "png") -> bytes:
    """One tile ``[C, H, W]`` (float in [0, 1], or uint8) as an 8-bit PNG or TIFF."""
    if tile.dtype != np.uint8:
        tile = np.rint(np.clip(np.nan_to_num(tile.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    channels = tile.shape[0]
    if channels not in _MODES:
        raise UserError(f"an endpoint tile must have 1, 3 or 4 bands, not {channels}")
    hwc = tile[0] if channels == 1 else np.ascontiguousarray(tile.transpose(1, 2, 0))
    buffer = io.BytesIO()
    # Pillow infers L, RGB or RGBA from the shape of uint8 data.
    Image.fromarray(hwc).save(buffer, format=_FORMATS[encoding][0])
    return buffer.getvalue()


def decode_tile(body: bytes, channels: int, width: int, height: int) -> np.ndarray:
    """An image body as float32 ``[1, C, height, width]`` / 255, zero-padded right and bottom when smaller
    (edge tiles may be). Raises UserError on bodies that are not images or are too large."""
    try:
        image = Image.open(io.BytesIO(body))
        image.load()
    except Exception as exc:  # Pillow raises several types for bad input
        raise UserError(f"the request body is not an image Pillow can read: {exc}") from exc
    if image.width > width or image.height > height:
        raise UserError(f"tile is {image.width}x{image.height} but the model takes {width}x{height}")
    array = np.asarray(image.convert(_MODES[channels]))
    if array.ndim == 2:
        array = array[:, :, None]
    out = np.zeros((1, channels, height, width), dtype=np.float32)
    out[0, :, : array.shape[0], : array.shape[1]] = array.transpose(2, 0, 1).astype(np.float32) / 255.0
    return out


def parse_features(doc: Any, label_of: Any, *, source: str = "endpoint") -> Detections:
    """Detections from a GeoJSON FeatureCollection in the OSML convention (module docstring).

    ``label_of`` maps a class name (or an integer class) to a label.
    """
    if (
        not isinstance(doc, dict)
        or doc.get("type") != "FeatureCollection"
        or not isinstance(doc.get("features"), list)
    ):
        raise UserError(f"{source} did not answer a GeoJSON FeatureCollection: {_excerpt(json.dumps(doc))}")
    features = doc["features"]
    boxes = np.zeros((len(features), 4), dtype=np.float32)
    scores = np.ones(len(features), dtype=np.float32)
    labels = np.zeros(len(features), dtype=np.int32)
    for i, feature in enumerate(features):
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict):
            raise UserError(f"{source}: feature {i} has no properties")
        try:
            boxes[i] = _bbox(props)
            name, score = _class_and_score(props)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise UserError(
                f"{source}: feature {i} is malformed ({exc}): {_excerpt(json.dumps(props))}"
            ) from exc
        labels[i] = label_of(name)
        scores[i] = score
    return Detections(boxes, scores, labels)


def _bbox(props: dict[str, Any]) -> list[float]:
    box = props.get("imageBBox", props.get("bounds_imcoords"))
    if box is None and isinstance(props.get("imageGeometry"), dict):
        xy = np.asarray(_flatten_coordinates(props["imageGeometry"]["coordinates"]), dtype=np.float64)
        if xy.size == 0:
            raise ValueError("empty imageGeometry")
        xy = xy.reshape(-1, 2)
        return [*xy.min(axis=0).tolist(), *xy.max(axis=0).tolist()]
    if box is None:
        raise KeyError("no imageBBox, bounds_imcoords or imageGeometry")
    values = [float(v) for v in box]
    if len(values) == 6:  # [minx, miny, minz, maxx, maxy, maxz], as RFC 7946 bboxes allow
        values = [values[0], values[1], values[3], values[4]]
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers, got {len(values)}")
    return values


def _flatten_coordinates(coords: Any) -> list[float]:
    if isinstance(coords, int | float):
        return [float(coords)]
    if isinstance(coords, list) and coords and isinstance(coords[0], int | float):
        return [float(c) for c in coords[:2]]
    out: list[float] = []
    for c in coords:
        out.extend(_flatten_coordinates(c))
    return out


def _class_and_score(props: dict[str, Any]) -> tuple[str | int, float]:
    classes = props.get("featureClasses", props.get("feature_types"))
    if isinstance(classes, dict):  # the older {name: score}
        classes = [{"iri": k, "score": v} for k, v in classes.items()]
    if isinstance(classes, list) and classes:
        best = max(classes, key=lambda c: float(c.get("score", 1.0)))
        return str(best["iri"]), float(best.get("score", 1.0))
    name = props.get("class", props.get("label"))
    if name is None:
        raise KeyError("no featureClasses, feature_types, class or label")
    score = float(props.get("score", props.get("detection_score", 1.0)))
    return (name if isinstance(name, int) else str(name)), score


def features_of(d: Detections, class_names: Sequence[str]) -> dict[str, Any]:
    """Detections (tile pixels) as an OSML-style FeatureCollection (what ``/invocations`` answers)."""
    features = []
    for (x1, y1, x2, y2), score, label in zip(
        d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True
    ):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        features.append(
            {
                "type": "Feature",
                "geometry": None,
                "properties": {
                    "imageGeometry": {
                        "type": "Polygon",
                        "coordinates": [[[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]],
                    },
                    "imageBBox": [x1, y1, x2, y2],
                    "featureClasses": [{"iri": name, "score": score}],
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def endpoint_server(detector: Detector, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``detector``: ``GET /ping`` and ``POST /invocations``.

    The body is one tile image (PNG, TIFF, JPEG: anything Pillow reads), taken as 8-bit and divided by 255;
    smaller tiles are zero-padded to the model's tile size. ``port=0`` picks a free port
    (``server.server_address[1]``). Call ``serve_forever()`` (e.g. on a thread) and ``shutdown()``.
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/ping":
                self._send(200, b"", "text/plain")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/invocations":
                self._send(404, b'{"error": "not found"}', "application/json")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                tile = decode_tile(body, detector.channels, detector.tile_width, detector.tile_height)
            except UserError as exc:
                self._send(400, json.dumps({"error": str(exc)}).encode(), "application/json")
                return
            try:
                (d,) = detector.detect(tile)
            except Exception as exc:  # the model failed: the client may retry
                log.exception("detector failed")
                self._send(500, json.dumps({"error": str(exc)}).encode(), "application/json")
                return
            payload = json.dumps(features_of(d, detector.class_names)).encode()
            self._send(200, payload, "application/geo+json")

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_endpoint(detector: Detector, host: str = "0.0.0.0", port: int = 8080) -> None:
    """Serve ``detector`` on ``host:port`` until interrupted (SageMaker/OSML containers listen on 8080)."""
    server = endpoint_server(detector, host, port)
    log.info(
        "serving %s on http://%s:%d", getattr(detector, "name", "detector"), host, server.server_address[1]
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _excerpt(payload: bytes | str, limit: int = 200) -> str:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
