"""``POST /classify`` over loopback with a real server thread: verdicts for frames, 422 for files that are
not frames, and the refusals a client can cause (token, size, length, slowness, path, method, too many
uploads at once)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.cloud.database import migrate
from services.errors import UserError
from services.fits_classifier.endpoint import (
    DEFAULT_MAX_CONCURRENT,
    MAX_CONCURRENT_ENV,
    TOKEN_ENV,
    fits_server,
)
from services.fits_classifier.model import FrameClassifier
from services.frames import generate_frame, write_fits

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# softmax([0, 2, -1])[1]: the wobble model's mirror_wobble probability for every frame.
WOBBLE = math.exp(2) / (1 + math.exp(2) + math.exp(-1))


@pytest.fixture
def classifier(wobble_model: Path) -> FrameClassifier:
    return FrameClassifier(wobble_model)


@pytest.fixture
def frame(tmp_path: Path) -> bytes:
    return write_fits(tmp_path / "f.fits", generate_frame("good", 1, (48, 48))).read_bytes()


@contextmanager
def running(classifier: FrameClassifier, **kwargs: Any) -> Iterator[int]:
    """A server on a free loopback port, serving on a thread; yields the port."""
    kwargs.setdefault("token", TOKEN)
    server = fits_server(classifier, host="127.0.0.1", port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, http.client.HTTPMessage, Any]:
    """Status, headers and JSON answer of one request."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    assert response.getheader("Content-Type") == "application/json"
    return response.status, response.headers, json.loads(payload)


def raw_exchange(port: int, head: bytes, body: bytes = b"", *, half_close: bool = False) -> bytes:
    """What the server answers to ``head`` then ``body`` sent by hand on a socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        if body:
            sock.sendall(body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("zipped", [False, True])
def test_a_frame_gets_the_models_verdict(classifier: FrameClassifier, frame: bytes, zipped: bool) -> None:
    body = gzip.compress(frame) if zipped else frame
    with running(classifier) as port:
        status, _, verdict = call(port, "POST", "/classify?name=night1%2Fa.fits", body, AUTH)
    assert status == 200
    assert verdict["status"] == "CLASSIFIED" and verdict["verdict"] == "mirror_wobble"
    assert verdict["score"] == pytest.approx(WOBBLE, abs=1e-5)
    assert verdict["source"] == "night1/a.fits"
    assert verdict["checksum"] == hashlib.sha256(body).hexdigest() and verdict["size_bytes"] == len(body)
    assert verdict["model"] == {"name": classifier.name, "version": classifier.version}
    assert verdict["reason"] is None and "recorded" not in verdict


def test_a_missing_or_wrong_token_gets_401(classifier: FrameClassifier, frame: bytes) -> None:
    with running(classifier) as port:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            status, answer_headers, answer = call(port, "POST", "/classify", frame, headers)
            assert status == 401, headers
            assert answer_headers["WWW-Authenticate"].startswith("Bearer")
            assert "bearer token" in answer["error"] and TOKEN not in answer["error"]


def test_the_token_comes_from_the_environment(
    classifier: FrameClassifier, frame: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    with running(classifier, token=None) as port:
        assert call(port, "POST", "/classify", frame)[0] == 401
        assert call(port, "POST", "/classify", frame, {"Authorization": "Bearer from-env"})[0] == 200


def test_unreadable_uploads_get_422_with_the_reason(classifier: FrameClassifier) -> None:
    with running(classifier) as port:
        empty = call(port, "POST", "/classify?name=empty.fits", b"", AUTH)
        text = call(port, "POST", "/classify", b"this is not a FITS file\n" * 10, AUTH)
    for status, _, verdict in (empty, text):
        assert status == 422
        assert verdict["status"] == "UNREADABLE" and verdict["verdict"] == "unreadable"
        assert verdict["score"] is None and verdict["error"].startswith("the frame is unreadable")
    assert "empty" in empty[2]["reason"] and empty[2]["source"] == "empty.fits"
    assert "not a FITS file" in text[2]["reason"] and text[2]["source"] == "upload"


def test_health_answers_without_a_token_and_tells_no_secrets(classifier: FrameClassifier) -> None:
    with running(classifier) as port:
        status, _, answer = call(port, "GET", "/health")
    assert status == 200
    assert answer == {"status": "ok", "model": classifier.name, "version": classifier.version}


def test_other_paths_and_methods_are_refused_in_json(classifier: FrameClassifier) -> None:
    with running(classifier) as port:
        missing = call(port, "GET", "/nowhere")
        wrong_get = call(port, "GET", "/classify")
        wrong_post = call(port, "POST", "/health", b"x", AUTH)
        wrong_put = call(port, "PUT", "/classify", b"x", AUTH)
        unknown = call(port, "BREW", "/classify")
        bad_name = call(port, "POST", "/classify?name=a%00b", b"x", AUTH)
    assert missing[0] == 404 and "POST /classify" in missing[2]["error"]
    assert wrong_get[0] == 405 and wrong_get[1]["Allow"] == "POST"
    assert wrong_post[0] == 405 and wrong_post[1]["Allow"] == "GET"
    assert wrong_put[0] == 405 and "takes POST" in wrong_put[2]["error"]
    assert unknown[0] == 501 and unknown[2]["error"]
    assert bad_name[0] == 400 and "?name= must be printable" in bad_name[2]["error"]


def test_an_oversized_body_gets_413_without_being_sent(classifier: FrameClassifier) -> None:
    with running(classifier, max_bytes=1000) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.putrequest("POST", "/classify")
        conn.putheader("Authorization", AUTH["Authorization"])
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()  # and no body: the answer must come anyway
        response = conn.getresponse()
        answer = json.loads(response.read())
        # A client that asks before sending gets no 100 Continue either.
        head = (
            f"POST /classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 1001\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        expecting = raw_exchange(port, head)
    assert response.status == 413 and response.getheader("Connection") == "close"
    assert "1000-byte limit" in answer["error"]
    assert expecting.startswith(b"HTTP/1.1 413 ") and b" 100 " not in expecting


def test_a_body_needs_a_length_and_must_arrive_whole_and_in_time(
    classifier: FrameClassifier, frame: bytes
) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    with running(classifier, timeout_s=0.3) as port:
        chunked = raw_exchange(
            port,
            f"POST /classify HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode(),
            b"5\r\nhello\r\n0\r\n\r\n",
        )
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(frame)}\r\n\r\n".encode()
        short = raw_exchange(port, head, frame[:100], half_close=True)
        slow = raw_exchange(port, head + frame[:100])  # and the rest never comes
        expecting = raw_exchange(port, head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"), frame)
    assert chunked.startswith(b"HTTP/1.1 411 ") and b"Content-Length is required" in chunked
    assert short.startswith(b"HTTP/1.1 400 ") and f"after 100 of the {len(frame)} bytes".encode() in short
    assert slow.startswith(b"HTTP/1.1 400 ") and b"did not arrive within 0.3 s" in slow
    assert expecting.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")


def test_serving_beyond_this_machine_needs_a_token(
    classifier: FrameClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "", "192.0.2.7"):
        with pytest.raises(UserError, match=f"without a token.*{TOKEN_ENV}"):
            fits_server(classifier, host=host, port=0)
    with pytest.raises(UserError, match="printable ASCII"):
        fits_server(classifier, port=0, token="has spaces")
    with pytest.raises(UserError, match="body limit"):
        fits_server(classifier, port=0, max_bytes=0)
    fits_server(classifier, host="0.0.0.0", port=0, token=TOKEN).server_close()
    with running(classifier) as port, pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}"):
        fits_server(classifier, port=port)  # taken


def test_verdicts_are_recorded_once_per_frame(
    classifier: FrameClassifier, frame: bytes, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn)
    with running(classifier, database_url=database_url) as port:
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # one connection, kept alive
        first = call(port, "POST", "/classify?name=a.fits", frame, AUTH, conn=kept)
        again = call(port, "POST", "/classify?name=copy-of-a.fits", frame, AUTH, conn=kept)
        broken = call(port, "POST", "/classify?name=broken.fits", b"garbage" * 100, AUTH)
    assert first[0] == again[0] == 200 and broken[0] == 422
    assert first[2]["recorded"]["new"] and not again[2]["recorded"]["new"]
    assert again[2]["recorded"]["id"] == first[2]["recorded"]["id"]
    assert broken[2]["recorded"]["new"]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT source, status, verdict, reason FROM fits_verdicts ORDER BY id"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("a.fits", "CLASSIFIED", "mirror_wobble"),
        ("broken.fits", "UNREADABLE", "unreadable"),
    ]
    assert rows[1][3] and "not a FITS file" in rows[1][3]


def _answer(sock: socket.socket) -> tuple[bytes, Any]:
    """The status line and JSON body of one answer read off ``sock`` (a 100 Continue is skipped)."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed mid-answer: {data!r}"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 100 "):
            break
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(data) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-body"
        data += chunk
    return head.split(b"\r\n", 1)[0], json.loads(data[:length])


def _hold(port: int, name: str, frame: bytes) -> socket.socket:
    """An upload whose slot the server has taken (it answered 100 Continue) and whose body is still coming:
    its headers and the first kilobyte are sent, the rest is not."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            f"POST /classify?name={name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(frame)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
    )
    continued = b""
    while b"\r\n\r\n" not in continued:
        chunk = sock.recv(1)  # byte by byte: nothing after the 100 Continue may be taken from the socket
        assert chunk, "the server closed an upload it should hold"
        continued += chunk
    assert continued == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(frame[:1024])
    return sock


def test_uploads_beyond_the_cap_get_503_at_once_and_health_still_answers(
    classifier: FrameClassifier, frame: bytes
) -> None:
    cap = 3
    with running(classifier, max_concurrent=cap, timeout_s=30) as port:
        for round_ in range(2):  # the second round finds every slot free again
            held = [_hold(port, f"held-{round_}-{i}.fits", frame) for i in range(cap)]
            try:
                started = time.monotonic()
                refused = call(port, "POST", "/classify?name=one-too-many.fits", frame, AUTH)
                waited = time.monotonic() - started
                health = call(port, "GET", "/health")
                unauthorized = call(port, "POST", "/classify", frame, {"Authorization": "Bearer nope"})
                for sock in held:
                    sock.sendall(frame[1024:])  # the slow bodies end
                answers = [_answer(sock) for sock in held]
            finally:
                for sock in held:
                    sock.close()
            status, headers, answer = refused
            assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"] == "close"
            assert answer == {
                "error": f"the classifier is busy: {cap} uploads are being read or classified, as many as "
                "it takes at once; send the frame again in 1 s"
            }
            assert waited < 2.0  # answered at once, not queued behind the held uploads
            assert health[0] == 200 and health[2]["status"] == "ok"
            assert unauthorized[0] == 401  # the token is still checked first
            for line, verdict in answers:
                assert line.startswith(b"HTTP/1.1 200 "), (line, verdict)
                assert verdict["verdict"] == "mirror_wobble" and verdict["size_bytes"] == len(frame)
            assert sorted(v["source"] for _, v in answers) == [f"held-{round_}-{i}.fits" for i in range(cap)]
        assert call(port, "POST", "/classify?name=after.fits", frame, AUTH)[0] == 200


def test_the_cap_on_concurrent_uploads_is_configured_or_refused(
    classifier: FrameClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MAX_CONCURRENT_ENV, raising=False)
    server = fits_server(classifier, port=0, token=TOKEN)
    assert server.max_concurrent == DEFAULT_MAX_CONCURRENT == 4
    server.server_close()
    monkeypatch.setenv(MAX_CONCURRENT_ENV, "7")
    server = fits_server(classifier, port=0, token=TOKEN)
    assert server.max_concurrent == 7
    server.server_close()
    server = fits_server(classifier, port=0, token=TOKEN, max_concurrent=2)  # the argument wins
    assert server.max_concurrent == 2
    server.server_close()
    monkeypatch.setenv(MAX_CONCURRENT_ENV, "many")
    with pytest.raises(UserError, match=f"{MAX_CONCURRENT_ENV} must be a whole number"):
        fits_server(classifier, port=0, token=TOKEN)
    for wrong in (0, -1, True):
        with pytest.raises(UserError, match="at least 1"):
            fits_server(classifier, port=0, token=TOKEN, max_concurrent=wrong)
