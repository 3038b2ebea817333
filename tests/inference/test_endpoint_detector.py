"""The HTTP endpoint mode: a real server on 127.0.0.1, retries, and the refusals a user can cause."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx_builders import CLASS_NAMES, TILE, tiles_of_means

from services.errors import UserError
from services.inference.detections import Detections
from services.inference.detector import Detector, OnnxDetector
from services.inference.endpoint import (
    EndpointDetector,
    EndpointUnavailableError,
    encode_tile,
    endpoint_server,
    parse_features,
)

# Multiples of 1/255, so the 8-bit image on the wire carries the tiles exactly.
MEANS = [200 / 255, 60 / 255, 0.0, 1.0]


@contextmanager
def running(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def scripted(answers: list[tuple[int, Any]]) -> Iterator[tuple[str, list[bytes]]]:
    """A server answering POSTs from a script of (status, JSON body or raw bytes); the last repeats."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            status, body = answers[min(len(bodies), len(answers)) - 1]
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url, bodies


ONE_CAR = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": None,
            "properties": {"imageBBox": [1, 2, 11, 12], "featureClasses": [{"iri": "car", "score": 0.8}]},
        }
    ],
}


def endpoint(url: str, **kwargs: Any) -> EndpointDetector:
    return EndpointDetector(url, tile_width=TILE, tile_height=TILE, backoff_s=0.01, **kwargs)


@pytest.mark.parametrize("encoding", ["png", "tiff"])
def test_served_model_gives_the_same_detections_as_the_local_one(contract_path: Path, encoding: str) -> None:
    local = OnnxDetector(contract_path, providers="cpu", batch_size=2)
    tiles = tiles_of_means(MEANS)
    expected = local.detect(tiles)
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        remote = endpoint(url, class_names=CLASS_NAMES, encoding=encoding)
        assert remote.ping()
        got = remote.detect(tiles)
    assert len(got) == len(expected)
    assert sum(len(d) for d in got) > 0
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.boxes, e.boxes)
        np.testing.assert_array_equal(g.scores, e.scores)
        np.testing.assert_array_equal(g.labels, e.labels)
    assert remote.class_names == CLASS_NAMES


def test_class_names_are_learned_from_responses(contract_path: Path) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        remote = endpoint(url)  # no class names given
        (d,) = remote.detect(tiles_of_means([1.0]))
    assert [remote.class_names[label] for label in d.labels] == CLASS_NAMES


def test_server_answers_ping_404_and_bad_bodies(contract_path: Path) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        with urllib.request.urlopen(f"{url}/ping") as r:
            assert r.status == 200 and r.read() == b""
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/nothing")
        assert missing.value.code == 404
        bad = urllib.request.Request(f"{url}/invocations", data=b"not an image", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad)
        assert refused.value.code == 400 and b"not an image" in refused.value.read()
        # A smaller (edge) tile is padded with zeros to the model's size.
        small = encode_tile(np.full((3, 16, 16), 1.0, np.float32))
        request = urllib.request.Request(f"{url}/invocations", data=small, method="POST")
        with urllib.request.urlopen(request) as r:
            doc = json.loads(r.read())
        assert r.headers["Content-Type"] == "application/geo+json"
        assert doc["type"] == "FeatureCollection" and doc["features"]
        # Too large a tile is refused.
        large = urllib.request.Request(
            f"{url}/invocations", data=encode_tile(np.zeros((3, 40, 40), np.float32)), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as too_large:
            urllib.request.urlopen(large)
        assert too_large.value.code == 400


def test_5xx_then_success_is_retried() -> None:
    with scripted([(503, {"error": "warming up"}), (500, b"oops"), (200, ONE_CAR)]) as (url, bodies):
        (d,) = endpoint(url, retries=3).detect(tiles_of_means([0.5]))
    assert len(bodies) == 3
    np.testing.assert_array_equal(d.boxes, [[1, 2, 11, 12]])
    assert d.scores[0] == pytest.approx(0.8)
    assert bodies[0].startswith(b"\x89PNG")


def test_5xx_forever_gives_up_after_the_retries() -> None:
    with (
        scripted([(502, b"bad gateway")]) as (url, bodies),
        pytest.raises(EndpointUnavailableError, match="failed 3 times; last: HTTP 502 bad gateway"),
    ):
        endpoint(url, retries=2).detect(tiles_of_means([0.5]))
    assert len(bodies) == 3


def test_4xx_is_a_user_error_without_retries() -> None:
    with (
        scripted([(415, {"error": "unsupported media type"})]) as (url, bodies),
        pytest.raises(UserError, match=r"refused the tile.*HTTP 415.*unsupported media type"),
    ):
        endpoint(url, retries=3).detect(tiles_of_means([0.5]))
    assert len(bodies) == 1


def test_connection_refused_is_retried_then_reported() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(EndpointUnavailableError, match="failed 2 times"):
        endpoint(f"http://127.0.0.1:{port}", retries=1).detect(tiles_of_means([0.5]))


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"<html>hello</html>", "not JSON: <html>hello</html>"),
        ({"type": "Feature"}, "did not answer a GeoJSON FeatureCollection"),
        ({"type": "FeatureCollection", "features": [{"properties": {"score": 1}}]}, "feature 0 is malformed"),
        ({"type": "FeatureCollection", "features": [{"properties": {"imageBBox": [1, 2]}}]}, "4 numbers"),
        ({"type": "FeatureCollection", "features": [{"geometry": None}]}, "feature 0 has no properties"),
    ],
)
def test_malformed_responses_are_user_errors(answer: Any, message: str) -> None:
    with scripted([(200, answer)]) as (url, _), pytest.raises(UserError, match=message):
        endpoint(url).detect(tiles_of_means([0.5]))


def labels_by_name(names: list[str]) -> Callable[[str | int], int]:
    def label_of(name: str | int) -> int:
        if isinstance(name, int):
            return name
        if name not in names:
            names.append(name)
        return names.index(name)

    return label_of


def test_feature_conventions_all_parse() -> None:
    doc = {
        "type": "FeatureCollection",
        "features": [
            # The current OSML convention, with a URL as the class IRI.
            {
                "properties": {
                    "imageGeometry": {"type": "Point", "coordinates": [5, 5]},
                    "imageBBox": [0, 0, 10, 10],
                    "featureClasses": [
                        {"iri": "http://x/ship", "score": 0.3},
                        {"iri": "http://x/boat", "score": 0.9},
                    ],
                }
            },
            # The older OSML names: bounds_imcoords and feature_types as {name: score}.
            {"properties": {"bounds_imcoords": [1, 1, 5, 5], "feature_types": {"car": 0.7}}},
            # Only a polygon; class and score as plain properties.
            {
                "properties": {
                    "imageGeometry": {
                        "type": "Polygon",
                        "coordinates": [[[2, 3], [8, 3], [8, 9], [2, 9], [2, 3]]],
                    },
                    "class": "car",
                    "detection_score": 0.6,
                }
            },
            # An RFC 7946-style 6-number box and an integer class.
            {"properties": {"imageBBox": [4, 4, 0, 6, 7, 0], "label": 2, "score": 0.5}},
        ],
    }
    names: list[str] = []
    d = parse_features(doc, labels_by_name(names))
    np.testing.assert_array_equal(d.boxes, [[0, 0, 10, 10], [1, 1, 5, 5], [2, 3, 8, 9], [4, 4, 6, 7]])
    np.testing.assert_allclose(d.scores, [0.9, 0.7, 0.6, 0.5])
    assert names == ["http://x/boat", "car"] and d.labels.tolist() == [0, 1, 1, 2]
    assert len(parse_features({"type": "FeatureCollection", "features": []}, labels_by_name([]))) == 0


def test_known_class_names_match_iri_endings() -> None:
    det = EndpointDetector("http://127.0.0.1:1", tile_width=8, tile_height=8, class_names=["ship", "boat"])
    assert det._label_of("http://foo.bar/sample/1.0.0/boat") == 1
    assert det._label_of("harbour") == 2 and det.class_names[2] == "harbour"


def test_both_detectors_fit_the_detector_protocol(contract_path: Path) -> None:
    detectors: list[Detector] = [
        OnnxDetector(contract_path, providers="cpu"),
        EndpointDetector("http://127.0.0.1:1", tile_width=TILE, tile_height=TILE),
    ]
    for d in detectors:
        assert (d.channels, d.tile_width, d.tile_height) == (3, TILE, TILE) and d.batch_size >= 1
        assert d.provider in {"CPUExecutionProvider", "CUDAExecutionProvider", "endpoint"}


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="1, 3 or 4 band"):
        EndpointDetector("http://h", tile_width=8, tile_height=8, channels=2)
    with pytest.raises(UserError, match="unknown tile encoding"):
        EndpointDetector("http://h", tile_width=8, tile_height=8, encoding="jp2")
    with pytest.raises(UserError, match="http:// or https://"):
        EndpointDetector("s3://bucket/model", tile_width=8, tile_height=8)
    det = EndpointDetector("http://h", tile_width=8, tile_height=8)
    with pytest.raises(UserError, match=r"takes tiles \[B, 3, 8, 8\]"):
        det.detect(np.zeros((1, 3, 9, 8), np.float32))
    assert det.detect(np.zeros((0, 3, 8, 8), np.float32)) == []


def test_single_band_tiles_round_trip(contract_path: Path, make_model: Callable[..., Path]) -> None:
    from onnx_builders import contract_model

    local = OnnxDetector(make_model(contract_model(channels=1), "gray"), providers="cpu")
    tiles = tiles_of_means([128 / 255], channels=1)
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        (got,) = endpoint(url, channels=1).detect(tiles)
    (want,) = local.detect(tiles)
    assert isinstance(got, Detections)
    np.testing.assert_array_equal(got.boxes, want.boxes)
