"""The bad-input corpus: every way a frame goes wrong at an observatory, each met where a user meets it.

One table, one test. Each kind is a real file written here, put through the path that would meet it with the
shipped classifier: ``tessera fits classify`` over a night's folder (``--report``, ``--record`` in a real
PostgreSQL, ``--annotated``), ``tessera fits watch --once`` over a folder a camera writes into, the queue
worker on moto's S3 and SQS, or ``POST /classify`` on the endpoint. For each kind the test asserts

- the message says what is wrong and what to do (``says``: fragments of the verdict's reason or the HTTP
  error, all of which must appear);
- the failure is recorded: an UNREADABLE verdict with that reason in the report and in PostgreSQL, or the
  HTTP status with a JSON error (and, for a 422, the verdict recorded too);
- nothing is lost: the bad file is byte for byte what it was, and the good frames beside it (in the same
  folder and batch, the same queue, the same server) are classified and recorded.

One row, BITPIX 64 integers, is a control: an unusual but valid frame that must be classified, not refused.
"""

from __future__ import annotations

import gzip
import io
import json
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import psycopg
import pytest
from astropy.io import fits
from PIL import Image

from services.cli import main
from services.cloud.database import apply_migrations, connect
from services.cloud.embedded import create_resources, worker_environment
from services.cloud.queue import send_message
from services.fits_classifier import sources as sources_module
from services.fits_classifier.endpoint import fits_server
from services.fits_classifier.model import SHIPPED_MODEL, FrameClassifier
from services.fits_classifier.worker import Worker, WorkerSettings
from services.frames import generate_frame

TOKEN = "corpus-token"
SERVER_LIMIT = 64 * 1024  # the endpoint's body limit in these tests
BLOCK = 2880


def hdus(*units: Any) -> bytes:
    """A FITS file of ``units`` written by astropy."""
    out = io.BytesIO()
    fits.HDUList(list(units)).writeto(out)
    return out.getvalue()


def header_only(cards: dict[str, Any]) -> bytes:
    """A primary header of ``cards`` padded to a FITS block, with no data after it."""
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header.tostring().encode("ascii")


def good_frame(seed: int, *, compress: bool = False) -> bytes:
    """A realistic 64 x 64 frame (16-bit ADU as a CCD writes it), tile-compressed in an SCI HDU or plain."""
    scratch = io.BytesIO()
    frame = generate_frame("good", seed, (64, 64))
    if compress:
        write = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(frame.data, name="SCI")])
    else:
        write = fits.HDUList([fits.PrimaryHDU(frame.data)])
    write.writeto(scratch)
    return scratch.getvalue()


def png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(out, "PNG")
    return out.getvalue()


def scaled_beyond_float32() -> bytes:
    """int32 pixels whose BSCALE is absurd: the physical values overflow any float32."""
    unit = fits.PrimaryHDU(np.full((64, 64), 1000, np.int32))
    unit.header["BSCALE"] = 1e300
    return hdus(unit)


@dataclass(frozen=True)
class Kind:
    """One row of the corpus: how the bad file is made, where it is met, and what must be said.

    ``path``: classify (``tessera fits classify`` over a folder), watch (``tessera fits watch --once``),
    worker (an S3 upload judged by the queue worker), serve (``POST /classify``). ``status``: the HTTP
    status for serve; None elsewhere. ``says``: every fragment must appear in the message, or, for the
    control row, None (the frame must be classified).
    """

    name: str
    path: str
    make: Callable[[], bytes]
    says: tuple[str, ...] | None
    file_name: str = "bad.fits"
    hdu: str | None = None
    status: int | None = None
    vanish: bool = False
    headers: dict[str, str] | None = None


GOOD = good_frame(1)
CORPUS = [
    Kind(
        "not FITS",
        "classify",
        lambda: b"observing log, night of 2026-12-05: dome opened 21:04\n" * 40,
        (
            "the file is not a FITS file: it starts with 'observing log, night'",
            "a FITS file with 'SIMPLE  ='",
        ),
    ),
    Kind(
        "wrong extension: a PNG named .fits",
        "worker",
        png,
        ("is not a FITS file: it is a PNG image", "send the FITS frame the camera wrote, or convert"),
    ),
    Kind(
        "truncated (copy cut short)",
        "watch",
        lambda: GOOD[: BLOCK + 1500],
        (
            "the file is truncated: HDU 0's header (BITPIX 16, NAXIS 64 x 64) claims 8192 bytes of data but "
            "the file holds only 1500",
            "copy the whole file again",
        ),
    ),
    Kind(
        "empty HDU (header only, no extension)",
        "classify",
        lambda: hdus(fits.PrimaryHDU()),
        (
            "holds no image data: no HDU is an image with pixels (HDUs: 0 PRIMARY PrimaryHDU)",
            "a frame is a 2-D image in the primary HDU or an image extension",
        ),
    ),
    Kind(
        "3-D cube",
        "classify",
        lambda: hdus(fits.PrimaryHDU(np.ones((3, 64, 64), np.float32))),
        ("HDU 0 (PRIMARY): the image is a 3-D cube of 3 planes of 64 x 64", "split the cube"),
    ),
    Kind(
        "1-pixel image",
        "classify",
        lambda: hdus(fits.PrimaryHDU(np.ones((1, 1), np.int16))),
        ("the image is a single pixel (1 x 1)", "expected a 2-D frame"),
    ),
    Kind(
        "1-D spectrum",
        "classify",
        lambda: hdus(fits.PrimaryHDU(np.ones(2048, np.float32))),
        ("the image is 1-D (2048 pixels)", "expected a 2-D frame"),
    ),
    Kind(
        "named HDU that does not exist (--hdu SCI)",
        "classify",
        lambda: GOOD,  # a fine frame, but in the primary HDU: the night's others have SCI extensions
        ("has no HDU named 'SCI' (HDUs: 0 PRIMARY PrimaryHDU)", "ask for one of these by EXTNAME or index"),
        hdu="SCI",
    ),
    Kind(
        "huge NAXIS, tiny data",
        "worker",
        lambda: (
            header_only({"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 100_000, "NAXIS2": 100_000})
            + b"\x00" * 16
        ),
        (
            "NAXIS 100000 x 100000) claims 20000000000 bytes of data but the file holds only 16",
            "fix the header if its NAXISn are wrong",
        ),
    ),
    Kind(
        "all-NaN frame",
        "classify",
        lambda: hdus(fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32))),
        ("every one of its 64 x 64 pixels is blank (NaN or BLANK)", "the readout failed"),
    ),
    Kind(
        "binary table only",
        "classify",
        lambda: hdus(
            fits.PrimaryHDU(),
            fits.BinTableHDU.from_columns([fits.Column("FLUX", "E", array=np.arange(9, dtype=np.float32))]),
        ),
        ("holds no image data", "1 (unnamed) BinTableHDU", "not a header alone or a table"),
    ),
    Kind(
        "corrupt gzip (transfer cut short)",
        "watch",
        lambda: gzip.compress(GOOD)[:300],
        ("truncated or corrupt gzip stream", "copy it again"),
        file_name="bad.fits.gz",
    ),
    Kind(
        "corrupt tile-compressed data",
        "classify",
        lambda: corrupt_tiles(good_frame(7, compress=True)),
        ("cannot read the FITS image, the file is corrupt", "copy it again"),
        file_name="bad.fits.fz",
    ),
    Kind(
        "scaling beyond float32 (BSCALE = 1e300)",
        "classify",
        scaled_beyond_float32,
        ("4096 pixel values lie beyond +-3.4e38", "(BSCALE/BZERO) is broken"),
    ),
    Kind(
        "file gone before its turn",
        "classify",
        lambda: GOOD,
        ("the file is gone: it was listed but deleted or moved", "classify it again"),
        vanish=True,
    ),
    Kind(
        "BITPIX 64 integers (valid: classified)",
        "classify",
        lambda: hdus(fits.PrimaryHDU(np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 2**40)),
        None,
    ),
    Kind(
        "0-byte upload",
        "serve",
        lambda: b"",
        ("the frame is unreadable: the file is empty (0 bytes); expected a FITS file",),
        status=422,
    ),
    Kind(
        "text upload",
        "serve",
        lambda: b"<html><body>502 Bad Gateway</body></html>\n",
        ("the frame is unreadable: the file is not a FITS file: it is an HTML page",),
        status=422,
    ),
    Kind(
        "wrong token",
        "serve",
        lambda: GOOD,
        ("missing or wrong bearer token", "'Authorization: Bearer <token>'"),
        status=401,
        headers={"Authorization": "Bearer not-the-token"},
    ),
    Kind(
        "oversized upload",
        "serve",
        lambda: hdus(fits.PrimaryHDU(np.ones((200, 200), np.float32))),
        (f"over this server's {SERVER_LIMIT}-byte limit", "send a smaller (e.g. tile-compressed) frame"),
        status=413,
    ),
]


def corrupt_tiles(raw: bytes) -> bytes:
    """``raw`` with the end of its compressed heap scrambled (the headers intact)."""
    damaged = bytearray(raw)
    end = len(raw.rstrip(b"\0"))
    for i in range(end - 600, end, 3):
        damaged[i] ^= 0xFF
    return bytes(damaged)


@dataclass
class Run:
    """One kind being run: its bad bytes, the test's folder, classifier and fixtures."""

    kind: Kind
    raw: bytes
    tmp_path: Path
    classifier: FrameClassifier
    capsys: pytest.CaptureFixture[str]
    request: pytest.FixtureRequest


@dataclass
class Met:
    """What the user met: the message, the recorded verdicts by file name, the good frames' verdicts."""

    message: str
    recorded: dict[str, tuple[str, str, str | None]]  # name -> (status, verdict, reason) in PostgreSQL
    answer: dict[str, Any] | None = None  # the endpoint's JSON answer


@pytest.fixture(scope="module")
def classifier() -> FrameClassifier:
    return FrameClassifier(SHIPPED_MODEL)


@pytest.mark.parametrize("kind", CORPUS, ids=[k.name for k in CORPUS])
def test_bad_input_is_explained_recorded_and_loses_nothing(  # noqa: PLR0917 (fixtures)
    kind: Kind,
    tmp_path: Path,
    database_url: str,
    classifier: FrameClassifier,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    raw = kind.make()
    with connect(database_url) as conn:
        apply_migrations(conn)
    monkeypatch.setenv("TESSERA_DB_URL", database_url)
    runner = {"classify": _classify, "watch": _watch, "worker": _worker, "serve": _serve}[kind.path]
    met = runner(Run(kind, raw, tmp_path, classifier, capsys, request))

    good_names = sorted(n for n in met.recorded if n.startswith("good"))
    assert len(good_names) == 2, met.recorded  # the frames beside the bad one ...
    for name in good_names:  # ... are classified and recorded
        status, verdict, reason = met.recorded[name]
        assert status == "CLASSIFIED" and verdict in classifier.class_names and reason is None, name
    if kind.says is None:  # the control row
        status, verdict, reason = met.recorded[kind.file_name]
        assert status == "CLASSIFIED" and verdict in classifier.class_names and reason is None
        return
    for fragment in kind.says:
        assert fragment in met.message, f"{kind.name}: {fragment!r} not in {met.message!r}"
    if kind.status in {401, 413}:  # refused before reading: nothing judged, nothing recorded
        assert kind.file_name not in met.recorded
    else:
        status, verdict, reason = met.recorded[kind.file_name]
        assert (status, verdict) == ("UNREADABLE", "unreadable")
        assert reason and all(f.removeprefix("the frame is unreadable: ") in reason for f in kind.says)


def _night(tmp_path: Path, kind: Kind, raw: bytes) -> tuple[Path, dict[Path, bytes]]:
    """A folder holding the bad file between two good frames (tile-compressed SCI ones under --hdu)."""
    night = tmp_path / "night"
    night.mkdir()
    compress = kind.hdu is not None
    suffix = ".fits.fz" if compress else ".fits"
    files = {
        night / f"good-a{suffix}": good_frame(2, compress=compress),
        night / kind.file_name: raw,
        night / f"good-z{suffix}": good_frame(3, compress=compress),
    }
    for path, body in files.items():
        path.write_bytes(body)
    return night, files


def _recorded(database_url: str) -> dict[str, tuple[str, str, str | None]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT source, status, verdict, reason FROM fits_verdicts").fetchall()
    return {row[0].rsplit("/", 1)[-1]: (row[1], row[2], row[3]) for row in rows}


def _classify(run: Run) -> Met:
    """``tessera fits classify NIGHT --report --record --annotated`` (one batch holds all three frames)."""
    kind, raw, tmp_path, capsys, request = run.kind, run.raw, run.tmp_path, run.capsys, run.request
    night, files = _night(tmp_path, kind, raw)
    report, annotated = tmp_path / "report.jsonl", tmp_path / "annotated"
    if kind.vanish:  # listed, then deleted before its turn (an operator tidying the night)
        listing = sources_module.list_sources

        def list_then_delete(targets: Any, **kwargs: Any) -> Any:
            found = listing(targets, **kwargs)
            (night / kind.file_name).unlink()
            return found

        request.getfixturevalue("monkeypatch").setattr(sources_module, "list_sources", list_then_delete)
    args = ["fits", "classify", str(night), "--model", str(SHIPPED_MODEL), "--report", str(report)]
    args += ["--record", "--annotated", str(annotated), *(["--hdu", kind.hdu] if kind.hdu else [])]
    status = main(args)
    out = capsys.readouterr().out
    lines = {Path(e["source"]).name: e for e in map(json.loads, report.read_text().splitlines())}
    assert sorted(lines) == sorted(p.name for p in files)  # one report line per frame
    bad = lines[kind.file_name]
    assert status == (0 if kind.says is None else 1)  # exit 1: some frame was unreadable
    assert kind.file_name in out and "3 frames in" in out  # the table names it; the summary counts it
    for path, body in files.items():
        if not (kind.vanish and path.name == kind.file_name):
            assert path.read_bytes() == body, path  # originals untouched
    classified = [p.name for p in annotated.iterdir()]
    assert len(classified) == sum(e["status"] == "CLASSIFIED" for e in lines.values())
    recorded = _recorded(request.getfixturevalue("database_url"))
    assert {n: (e["status"], e["verdict"], e["reason"]) for n, e in lines.items()} == recorded
    return Met(bad["reason"] or "", recorded)


@contextmanager
def _signals_kept() -> Iterator[None]:
    """``tessera fits watch`` installs SIGINT/SIGTERM handlers; give pytest its own back."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler)


def _watch(run: Run) -> Met:
    """``tessera fits watch NIGHT --once --record``: a camera's folder, every file settled."""
    kind, raw, tmp_path, capsys, request = run.kind, run.raw, run.tmp_path, run.capsys, run.request
    night, files = _night(tmp_path, kind, raw)
    report = tmp_path / "watch.jsonl"
    with _signals_kept():
        status = main(
            [
                "fits",
                "watch",
                str(night),
                "--model",
                str(SHIPPED_MODEL),
                "--report",
                str(report),
                "--once",
                "--record",
            ]
        )
    out = capsys.readouterr().out
    assert status == 0
    lines = {Path(e["source"]).name: e for e in map(json.loads, report.read_text().splitlines())}
    assert sorted(lines) == sorted(p.name for p in files)
    [shown] = [line for line in out.splitlines() if f"/{kind.file_name}  (" in line]
    assert shown.split()[1] == "unreadable"  # the watcher's line for it, with the reason
    assert shown.endswith(f"({lines[kind.file_name]['reason']})")
    for path, body in files.items():
        assert path.read_bytes() == body, path
    recorded = _recorded(request.getfixturevalue("database_url"))
    return Met(lines[kind.file_name]["reason"] or "", recorded)


def _worker(run: Run) -> Met:
    """Uploaded to the imagery bucket's incoming prefix and judged by the queue worker from its event."""
    kind, raw, classifier, request = run.kind, run.raw, run.classifier, run.request
    aws = request.getfixturevalue("aws")
    database_url = request.getfixturevalue("database_url")
    monkeypatch = request.getfixturevalue("monkeypatch")
    resources = create_resources(aws, prefix=f"t{uuid.uuid4().hex[:10]}", max_receive_count=3, notify=False)
    for key, value in worker_environment(aws, resources, database_url, service="fits-classifier").items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    imagery, queue = resources.buckets["imagery"], resources.queue_urls["fits-frames"]
    objects = {"good-a.fits": good_frame(2), kind.file_name: raw, "good-z.fits": good_frame(3)}
    for name, body in objects.items():
        key = f"fits/incoming/2026-12-05/{name}"
        s3.put_object(Bucket=imagery, Key=key, Body=body)
        send_message(queue, _s3_event(imagery, key, len(body)))
    worker = Worker(WorkerSettings.from_env(wait_s=0), classifier)
    try:
        handled = 0
        while worker.poll(wait_s=0):
            handled += 1
    finally:
        worker.close()
    assert handled == 3
    for name, body in objects.items():  # the originals untouched
        key = f"fits/incoming/2026-12-05/{name}"
        assert s3.get_object(Bucket=imagery, Key=key)["Body"].read() == body
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert set(attributes.values()) == {"0"}  # every message settled: none left to redeliver
    recorded = _recorded(database_url)
    return Met(recorded.get(kind.file_name, ("", "", ""))[2] or "", recorded)


def _s3_event(bucket: str, key: str, size: int) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": size}},
            }
        ]
    }


def _serve(run: Run) -> Met:
    """``POST /classify`` on a recording server, the bad upload between two good ones."""
    kind, raw, tmp_path, classifier, request = run.kind, run.raw, run.tmp_path, run.classifier, run.request
    import http.client
    import threading

    database_url = request.getfixturevalue("database_url")
    client_copy = tmp_path / kind.file_name
    client_copy.write_bytes(raw)
    server = fits_server(
        classifier, port=0, token=TOKEN, max_bytes=SERVER_LIMIT, database_url=database_url, timeout_s=10
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    port = int(server.server_address[1])
    answers: dict[str, tuple[int, dict[str, Any]]] = {}
    try:
        for name, body, headers in (
            ("good-a.fits", good_frame(2), None),
            (kind.file_name, client_copy.read_bytes(), kind.headers),
            ("good-z.fits", good_frame(3), None),
        ):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(
                "POST",
                f"/classify?name={name}",
                body=body,
                headers=headers or {"Authorization": f"Bearer {TOKEN}"},
            )
            response = conn.getresponse()
            assert response.getheader("Content-Type") == "application/json"
            answers[name] = (response.status, json.loads(response.read()))
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    status, answer = answers[kind.file_name]
    assert status == kind.status, answer
    assert answers["good-a.fits"][0] == answers["good-z.fits"][0] == 200
    assert client_copy.read_bytes() == raw  # the client's file untouched
    if status == 422:  # judged: the verdict, recorded
        assert answer["status"] == "UNREADABLE" and answer["recorded"]["new"] is True
        assert answer["error"] == f"the frame is unreadable: {answer['reason']}"
    else:  # refused before the body was read: an error and nothing else
        assert set(answer) == {"error"}
    return Met(answer["error"], _recorded(database_url), answer)
