"""``tessera fits demo`` end to end, small: the embedded default (moto + PostgreSQL), two worker processes
running the shipped classifier, a paced night of ten generated frames. What its user sees is checked against
what the platform holds: every frame judged by a worker while the night was still arriving, the accuracy
and confusion matrix recomputed from PostgreSQL and the truth the generator wrote into each frame, the
throughput, the contact sheet's tiles per verdict, and no worker left running."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import time
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.cloud.database import connect
from services.cloud.embedded import EmbeddedPlatform
from services.fits_classifier.demo import SHEET_PER_VERDICT, THUMB, DemoSettings, run_demo
from services.fits_classifier.model import SHIPPED_MODEL, FrameClassifier
from services.frames import read_frame

#: Ten 256-pixel frames, one every 0.4 s (a camera's cadence), over two workers.
SMALL = DemoSettings(frames=10, side=256, workers=2, seed=2026, timeout_s=120.0, interval_s=0.4)
NIGHT_PREFIX = "fits/incoming/2026-12-05/"


@dataclass
class Ran:
    """One demo run and what the platform held after it."""

    status: int
    printed: str
    seconds: float
    out: Path
    result: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # PostgreSQL's fits_verdicts, by source
    truth: dict[str, str]  # SIMLABEL of each original frame in the imagery bucket, by source
    annotated: dict[str, Any]  # the header of each annotated copy in the results bucket, by source


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("fits-demo")
    platform = EmbeddedPlatform().start()
    try:
        printed = io.StringIO()
        started = time.monotonic()
        with redirect_stdout(printed):  # what `tessera fits demo` prints (run_demo's console is stdout)
            status = run_demo(DemoSettings(**{**SMALL.__dict__, "out_dir": out}), platform=platform)
        seconds = time.monotonic() - started
        with connect(platform.database_url) as conn:
            rows = {
                row[0]: dict(
                    zip(
                        ("source", "status", "verdict", "score", "annotated", "classified_at"),
                        row,
                        strict=True,
                    )
                )
                for row in conn.execute(
                    "SELECT source, status, verdict, score, annotated, classified_at FROM fits_verdicts"
                ).fetchall()
            }
        s3 = platform.client("s3")
        imagery, results = platform.bucket("imagery"), platform.bucket("results")
        truth = {}
        for item in s3.list_objects_v2(Bucket=imagery, Prefix=NIGHT_PREFIX)["Contents"]:
            raw = s3.get_object(Bucket=imagery, Key=item["Key"])["Body"].read()
            truth[f"s3://{imagery}/{item['Key']}"] = str(read_frame(raw).header["SIMLABEL"])
        annotated = {}
        for source, row in rows.items():
            if row["annotated"]:
                key = row["annotated"].split(f"s3://{results}/", 1)[1]
                copy = s3.get_object(Bucket=results, Key=key)["Body"].read()
                annotated[source] = read_frame(copy).header
        result = json.loads((out / "result.json").read_text())
        yield Ran(status, printed.getvalue(), seconds, out, result, rows, truth, annotated)
    finally:
        platform.stop()


def test_every_frame_is_judged_by_a_worker_as_the_night_arrives(ran: Ran) -> None:
    assert ran.status == 0
    assert len(ran.truth) == SMALL.frames  # every frame reached the incoming prefix
    assert set(ran.rows) == set(ran.truth)  # and has exactly one verdict in PostgreSQL
    assert all(row["status"] == "CLASSIFIED" for row in ran.rows.values())
    per_frame = {f["source"]: f for f in ran.result["per_frame"]}
    uploaded = {source: np.datetime64(f["uploaded_at"].rstrip("Z")) for source, f in per_frame.items()}
    judged = {
        s: np.datetime64(r["classified_at"].astimezone(dt.UTC).replace(tzinfo=None))
        for s, r in ran.rows.items()
    }
    assert all(judged[s] >= uploaded[s] for s in judged)  # judged after it arrived, never before
    # As it arrived: the first verdicts were recorded while later frames were still being uploaded.
    assert min(judged.values()) < max(uploaded.values())
    # By the worker processes: each logged its verdicts and wrote the annotated copy.
    logs = "".join(p.read_text() for p in sorted(ran.out.glob("worker-*.log")))
    assert len(list(ran.out.glob("worker-*.log"))) == SMALL.workers
    for source, row in ran.rows.items():
        assert f"{source}: {row['verdict']}" in logs
        header = ran.annotated[source]
        assert header["TSVERDCT"] == row["verdict"]
        assert header["TSSCORE"] == pytest.approx(row["score"], abs=1e-6)
        assert header["TSMODEL"] == FrameClassifier(SHIPPED_MODEL).name


def test_accuracy_and_confusion_are_recomputed_from_postgresql(ran: Ran) -> None:
    # The truth is what the generator wrote into each frame (SIMLABEL), not the demo's own bookkeeping.
    assert Counter(ran.truth.values()) == {"good": 6, "mirror_wobble": 2, "shutter_fault": 2}
    correct = sum(ran.rows[s]["verdict"] == label for s, label in ran.truth.items())
    accuracy = correct / len(ran.truth)
    assert (ran.result["correct"], ran.result["frames"]) == (correct, SMALL.frames)
    assert ran.result["accuracy"] == pytest.approx(accuracy)
    confusion: dict[str, Counter[str]] = {}
    for source, label in ran.truth.items():
        confusion.setdefault(label, Counter())[ran.rows[source]["verdict"]] += 1
    for label, row in ran.result["confusion"].items():
        assert {k: v for k, v in row.items() if v} == dict(confusion.get(label, {})), label
    assert ran.result["verdicts"] == dict(Counter(r["verdict"] for r in ran.rows.values()))
    text = " ".join(ran.printed.split())  # rich wraps long lines
    assert f"{SMALL.frames} frames, {correct} of {SMALL.frames} verdicts right ({accuracy:.1%})" in text
    assert "truth (rows) x verdict (columns)" in text


def test_throughput_is_printed_and_adds_up(ran: Ran) -> None:
    text = " ".join(ran.printed.split())
    found = re.search(
        r"throughput: ([\d.]+) frames/s from the first upload to the last verdict \(([\d.]+) s\); "
        r"median (\d+) ms of work per frame",
        text,
    )
    assert found, text
    rate, seconds = float(found[1]), float(found[2])
    assert rate == pytest.approx(SMALL.frames / ran.result["seconds"], abs=0.01)
    assert seconds == pytest.approx(ran.result["seconds"], abs=0.05)
    # The night took at least its cadence (nine gaps of 0.4 s) and no longer than the whole run.
    assert 9 * SMALL.interval_s <= ran.result["seconds"] <= ran.seconds
    assert ran.result["model_seconds_per_frame"] > 0


def test_the_contact_sheet_has_tiles_for_each_verdict(ran: Ran) -> None:
    sheet = ran.out / "contact-sheet.png"
    assert ran.result["contact_sheet"] == str(sheet) and f"contact sheet: {sheet}" in ran.printed.replace(
        "\n", ""
    )
    verdicts = sorted({r["verdict"] for r in ran.rows.values()})
    counts = Counter(r["verdict"] for r in ran.rows.values())
    pixels = np.asarray(Image.open(sheet))
    caption = 34
    assert pixels.shape == (
        len(verdicts) * (THUMB + caption + 8) + 8,
        SHEET_PER_VERDICT * (THUMB + 8) + 8,
    )
    for r, verdict in enumerate(verdicts):
        top = 8 + r * (THUMB + caption + 8)
        for c in range(SHEET_PER_VERDICT):
            left = 8 + c * (THUMB + 8)
            tile = pixels[top : top + THUMB, left : left + THUMB]
            if c < min(counts[verdict], SHEET_PER_VERDICT):
                assert tile.std() > 1, (verdict, c)  # a frame's thumbnail
            else:
                assert (tile == 24).all(), (verdict, c)  # an empty slot: background only


def test_no_worker_is_left_running(ran: Ran) -> None:
    pids = ran.result["worker_pids"]
    assert len(pids) == SMALL.workers
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} is still running"
    mine = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = stat.read_text().rsplit(")", 1)[1].split()[1]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue  # gone meanwhile
        assert not (parent == mine and b"fits-classifier" in command), command
