"""``tessera fits classify``: folders, files and S3 prefixes judged, with a table, a JSON lines report,
annotated copies and recorded verdicts; unreadable frames reported, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import psycopg
import pytest

from services.cli import main
from services.cloud.embedded import Resources
from services.frames import generate_frame, write_fits


def test_a_folder_is_classified_with_a_report_and_annotated_copies(
    tmp_path: Path, frames_dir: Path, wobble_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "out" / "report.jsonl"
    annotated = tmp_path / "out" / "annotated"
    before = {p: p.read_bytes() for p in frames_dir.iterdir()}
    status = main(
        [
            "fits",
            "classify",
            str(frames_dir),
            "--model",
            str(wobble_model),
            "--report",
            str(report),
            "--annotated",
            str(annotated),
            "--batch",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert status == 1  # two frames were unreadable
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [Path(line["source"]).name for line in lines] == ["a.fits", "b.fits.fz", "c.fits", "d.fits"]
    verdicts = {Path(line["source"]).name: line for line in lines}
    assert verdicts["a.fits"]["verdict"] == "mirror_wobble" and verdicts["a.fits"]["status"] == "CLASSIFIED"
    assert verdicts["b.fits.fz"]["hdu"] == "SCI"
    assert verdicts["c.fits"]["verdict"] == "unreadable" and "FITS" in verdicts["c.fits"]["reason"]
    assert "empty" in verdicts["d.fits"]["reason"]
    assert verdicts["a.fits"]["model"]["name"] == "test-classifier"
    assert len(list(annotated.iterdir())) == 2  # classified frames only
    assert all(Path(verdicts[n]["annotated"]).is_file() for n in ("a.fits", "b.fits.fz"))
    assert {p: p.read_bytes() for p in frames_dir.iterdir()} == before  # originals untouched
    assert "4 frames in" in out and "2 mirror_wobble" in out and "2 unreadable" in out
    assert "c.fits" in out  # the table names each frame


def test_usage_errors_say_what_to_fix(
    tmp_path: Path, wobble_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fits", "classify", str(tmp_path / "nowhere"), "--model", str(wobble_model)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["fits", "classify", str(tmp_path / "empty"), "--model", str(wobble_model)]) == 2
    assert "holds no FITS files" in capsys.readouterr().err
    assert main(["fits", "classify", str(tmp_path), "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "give --model" in capsys.readouterr().err


def test_an_s3_prefix_is_classified_and_recorded_once(  # noqa: PLR0917 (fixtures)
    tmp_path: Path,
    resources: Resources,
    database_url: str,
    wobble_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = resources.buckets["imagery"]
    s3 = boto3.client("s3")
    for index in range(3):
        frame = write_fits(tmp_path / f"f{index}.fits", generate_frame("good", index, (48, 48)))
        s3.upload_file(str(frame), bucket, f"fits/incoming/2026-12-05/f{index}.fits")
    s3.put_object(Bucket=bucket, Key="fits/incoming/2026-12-05/readme.txt", Body=b"skip me")
    monkeypatch.setenv("TESSERA_DB_URL", database_url)
    results = f"s3://{resources.buckets['results']}/fits/annotated"
    for _ in range(2):  # a second run over the same frames records nothing new
        status = main(
            [
                "fits",
                "classify",
                f"s3://{bucket}/fits/incoming/",
                "--model",
                str(wobble_model),
                "--record",
                "--annotated",
                results,
            ]
        )
        assert status == 0
    assert "3 frames in" in capsys.readouterr().out
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT source, verdict, annotated FROM fits_verdicts ORDER BY source").fetchall()
    assert [r[0].rsplit("/", 1)[-1] for r in rows] == ["f0.fits", "f1.fits", "f2.fits"]
    assert all(r[2].startswith(results + "/") for r in rows)
    listed = s3.list_objects_v2(Bucket=resources.buckets["results"], Prefix="fits/annotated/")
    assert len(listed.get("Contents", [])) == 3
