"""Verdicts that last: a copy of the frame carries its verdict, the original is untouched, and PostgreSQL
holds one verdict per frame and model version however often the frame comes back."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import psycopg
import pytest
from astropy.io import fits
from fits_models import constant_classifier

from services.cloud.database import migrate
from services.fits_classifier.annotate import annotated_copy
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.output import AnnotatedStore, copy_name
from services.fits_classifier.records import counts, record
from services.fits_classifier.verdicts import judge
from services.frames import generate_frame, read_frame, write_fits


@pytest.fixture
def classifier(tmp_path: Path) -> FrameClassifier:
    return FrameClassifier(constant_classifier(tmp_path / "m.onnx", [0.0, 2.0, -1.0]))


@pytest.mark.parametrize("name", ["plain.fits", "packed.fits.fz", "zipped.fits.gz"])
def test_the_copy_carries_the_verdict_and_the_same_pixels(
    tmp_path: Path, classifier: FrameClassifier, name: str
) -> None:
    path = tmp_path / name
    frame = generate_frame("mirror_wobble", 5, (64, 80))
    if name.endswith(".gz"):
        plain = write_fits(tmp_path / "plain-for-gz.fits", frame)
        path.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        write_fits(path, frame)
    original = path.read_bytes()
    [verdict] = judge(classifier, [(str(path), original)])
    copy = annotated_copy(original, verdict)

    assert path.read_bytes() == original  # never modified
    assert copy.startswith(b"\x1f\x8b") == name.endswith(".gz")  # same form as the original
    annotated = read_frame(copy)
    assert np.array_equal(annotated.data, read_frame(original).data)  # lossless, same HDU
    assert annotated.header["TSVERDCT"] == "mirror_wobble"
    assert annotated.header["TSSCORE"] == pytest.approx(verdict.score, abs=1e-6)
    assert annotated.header["TSSHA256"] == verdict.checksum
    assert annotated.header["TSMODEL"] == "test-classifier"
    data = gzip.decompress(copy) if name.endswith(".gz") else copy
    with fits.open(__import__("io").BytesIO(data)) as hdus:
        assert hdus[0].header["TSVERDCT"] == "mirror_wobble"  # the primary header says it too


def test_the_store_names_copies_by_checksum_and_writes_them_whole(
    tmp_path: Path, classifier: FrameClassifier
) -> None:
    raw = write_fits(tmp_path / "night1" / "frame.fits", generate_frame("good", 1, (48, 48))).read_bytes()
    other = write_fits(tmp_path / "night2" / "frame.fits", generate_frame("good", 2, (48, 48))).read_bytes()
    verdicts = judge(classifier, [("night1/frame.fits", raw), ("night2/frame.fits", other)])
    store = AnnotatedStore(str(tmp_path / "results"))
    written = [Path(store.put(v, r)) for v, r in zip(verdicts, [raw, other], strict=True)]
    assert len({p.name for p in written}) == 2  # same file name, different frames: two copies
    assert written[0].name == copy_name(verdicts[0]) and ":" not in written[0].name
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(p.name for p in written)


def test_a_frame_has_one_verdict_per_model_version(
    tmp_path: Path, database_url: str, classifier: FrameClassifier
) -> None:
    raw = write_fits(tmp_path / "f.fits", generate_frame("good", 1, (48, 48))).read_bytes()
    [verdict] = judge(classifier, [("f.fits", raw)])
    [again] = judge(classifier, [("copy-of-f.fits", raw)])  # the same bytes under another name
    retrained = FrameClassifier(constant_classifier(tmp_path / "m2.onnx", [0.0, 2.0, -1.5]))
    [newer] = judge(retrained, [("f.fits", raw)])
    [bad] = judge(classifier, [("broken.fits", b"garbage" * 100)])
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn)
        first = record(conn, verdict, annotated="results/x.fits")
        second = record(conn, again)
        third = record(conn, newer)
        fourth = record(conn, bad)
        assert first.new and not second.new and third.new and fourth.new
        assert second.id == first.id and second.annotated == "results/x.fits"
        assert counts(conn) == {"mirror_wobble": 2, "unreadable": 1}
        assert counts(conn, model_name="nobody") == {}
        rows = conn.execute(
            "SELECT source, status, reason, model_version FROM fits_verdicts ORDER BY id"
        ).fetchall()
    assert [r[0] for r in rows] == ["f.fits", "f.fits", "broken.fits"]
    assert rows[2][1] == "UNREADABLE" and rows[2][2]
    assert rows[0][3] != rows[1][3]  # a retrained model is another version
