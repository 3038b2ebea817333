"""The HTTP endpoint mode: a real server on 127.0.0.1, retries, and the refusals a user can cause."""

from __future__ import annotations

import http.client
import inspect
import json
import socket
import threading
import time
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
    MAX_BODY_ENV,
    TIMEOUT_ENV,
    TOKEN_ENV,
    EndpointDetector,
    EndpointUnavailableError,
    endpoint_server,
    serve_endpoint,
)
from services.inference.endpoint_wire import encode_tile, parse_features

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


# The trust boundary: loopback by default, a bearer token, bounded bodies, and a client that gives up.

TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def no_endpoint_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests say which token, timeout and body limit they mean; the environment does not."""
    for name in (TOKEN_ENV, TIMEOUT_ENV, MAX_BODY_ENV):
        monkeypatch.delenv(name, raising=False)


def raw_post(url: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """POST /invocations with exactly these headers (no Content-Length unless given) and body."""
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("POST", "/invocations", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_the_server_binds_loopback_by_default(contract_path: Path) -> None:
    for serve in (endpoint_server, serve_endpoint):
        assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    server = endpoint_server(OnnxDetector(contract_path, providers="cpu"), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "192.0.2.7", "model.internal"])
def test_a_non_loopback_bind_without_a_token_is_refused(contract_path: Path, host: str) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    with pytest.raises(UserError, match=f"refusing to serve .* without a token.*{TOKEN_ENV}"):
        endpoint_server(local, host, 0)
    with pytest.raises(UserError, match="without a token"):
        serve_endpoint(local, host, 0)


def test_a_non_loopback_bind_with_a_token_serves(
    contract_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    endpoint_server(local, "0.0.0.0", 0, token=TOKEN).server_close()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    endpoint_server(local, "0.0.0.0", 0).server_close()


def test_requests_without_the_token_get_401(contract_path: Path) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    tile = encode_tile(tiles_of_means([1.0])[0])
    with running(endpoint_server(local, "127.0.0.1", 0, token=TOKEN)) as url:
        length = {"Content-Length": str(len(tile))}
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"X-Token": TOKEN}):
            status, headers, body = raw_post(url, {**length, **auth}, tile)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            assert json.loads(body) == {"error": "missing or wrong bearer token"}
        with pytest.raises(urllib.error.HTTPError) as ping:
            urllib.request.urlopen(f"{url}/ping")
        assert ping.value.code == 401
        assert not endpoint(url).ping()
        status, _, body = raw_post(url, {**length, "Authorization": f"bearer {TOKEN}"}, tile)
        assert status == 200 and json.loads(body)["features"]
        # The client reports it, without retrying: no token, and a wrong one.
        with pytest.raises(UserError, match=f"HTTP 401.*got no token.*set {TOKEN_ENV}"):
            endpoint(url, retries=3).detect(tiles_of_means([1.0]))
        with pytest.raises(UserError, match=r"HTTP 401.*a token that it does not accept"):
            endpoint(url, token="wrong").detect(tiles_of_means([1.0]))


def test_the_client_with_the_token_gets_the_local_detections(
    contract_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = OnnxDetector(contract_path, providers="cpu", batch_size=2)
    tiles = tiles_of_means(MEANS)
    expected = local.detect(tiles)
    with running(endpoint_server(local, "127.0.0.1", 0, token=TOKEN)) as url:
        remote = endpoint(url, class_names=CLASS_NAMES, token=TOKEN)
        assert remote.ping()
        got = remote.detect(tiles)
        # As the model runner builds it: no token argument, the token from the environment.
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        from_env = endpoint(url, class_names=CLASS_NAMES).detect(tiles)
    assert TOKEN not in repr(remote)
    assert sum(len(d) for d in got) > 0
    for g, f, e in zip(got, from_env, expected, strict=True):
        np.testing.assert_array_equal(g.boxes, e.boxes)
        np.testing.assert_array_equal(f.boxes, e.boxes)
        np.testing.assert_array_equal(g.scores, e.scores)
        np.testing.assert_array_equal(g.labels, e.labels)


def test_an_oversized_body_gets_413_without_being_read(contract_path: Path) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running(endpoint_server(local, "127.0.0.1", 0, token=TOKEN, max_body_bytes=1000)) as url:
        started = time.monotonic()
        # Claims a gigabyte, sends four bytes: a server that read the body would wait for the rest.
        status, headers, body = raw_post(url, {**auth, "Content-Length": str(10**9)}, b"tiny")
        assert time.monotonic() - started < 2
        assert status == 413 and b"1000-byte limit" in body and headers["Connection"] == "close"
        # The client says what to change.
        with pytest.raises(UserError, match=r"refused a \d+-byte PNG tile as too large \(HTTP 413\)"):
            noise = np.random.default_rng(0).random((1, 3, TILE, TILE), dtype=np.float32)  # ~3 KB as PNG
            endpoint(url, token=TOKEN).detect(noise)
        # Under the limit is served.
        small = encode_tile(np.zeros((3, 4, 4), np.float32))
        assert raw_post(url, {**auth, "Content-Length": str(len(small))}, small)[0] == 200


def test_max_body_bytes_from_the_environment(contract_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    monkeypatch.setenv(MAX_BODY_ENV, "10")
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        assert raw_post(url, {"Content-Length": "11"}, b"x" * 11)[0] == 413
    monkeypatch.setenv(MAX_BODY_ENV, "lots")
    with pytest.raises(UserError, match=f"{MAX_BODY_ENV} must be a number"):
        endpoint_server(local, "127.0.0.1", 0)


def test_a_body_without_a_length_gets_411(contract_path: Path) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        status, _, body = raw_post(url, {})
        assert status == 411 and b"Content-Length is required" in body
        chunked = b"4\r\ntiny\r\n0\r\n\r\n"
        assert raw_post(url, {"Transfer-Encoding": "chunked"}, chunked)[0] == 411
        status, _, body = raw_post(url, {"Content-Length": "-5"}, b"")
        assert status == 400 and b"whole number" in body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00garbage\xff" * 10, b"not an image Pillow can read"),
        # A real PNG header (the size fits) with the pixel data cut off.
        (encode_tile(np.full((3, 16, 16), 0.5, np.float32))[:60], b"not an image Pillow can decode"),
        (b"", b"not an image Pillow can read"),
    ],
)
def test_a_malformed_body_gets_400_and_a_short_message(
    contract_path: Path, body: bytes, message: bytes
) -> None:
    local = OnnxDetector(contract_path, providers="cpu")
    with running(endpoint_server(local, "127.0.0.1", 0)) as url:
        status, _, answer = raw_post(url, {"Content-Length": str(len(body))}, body)
    assert status == 400 and message in answer
    assert b"Traceback" not in answer and len(answer) < 300
    assert set(json.loads(answer)) == {"error"}


@contextmanager
def hung_endpoint() -> Iterator[str]:
    """A port that takes connections (the kernel's backlog) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_hung_endpoint_fails_the_batch_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    with hung_endpoint() as url:
        remote = endpoint(url, timeout_s=0.5, retries=3, token=TOKEN)
        started = time.monotonic()
        with pytest.raises(EndpointUnavailableError, match=r"did not answer within 0.5 s.*" + TIMEOUT_ENV):
            remote.detect(tiles_of_means([0.5, 0.6]))
        assert time.monotonic() - started < 2.5  # not retried: a hung model hangs every retry
        monkeypatch.setenv(TIMEOUT_ENV, "0.3")
        assert endpoint(url).timeout_s == 0.3
        with pytest.raises(EndpointUnavailableError, match=r"within 0.3 s"):
            endpoint(url).detect(tiles_of_means([0.5]))
    assert endpoint(url).timeout_s == 0.3
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=f"{TIMEOUT_ENV} must be a number"):
        endpoint(url)
    with pytest.raises(UserError, match="must be more than 0"):
        endpoint(url, timeout_s=0)
    with pytest.raises(UserError, match="printable ASCII"):
        endpoint(url, timeout_s=1, token="two words")
