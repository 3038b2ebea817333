"""Fixtures for the frame classifier's tests: frames on disk and small classifiers with known answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from fits_models import constant_classifier

from services.frames import generate_frame, write_fits


@pytest.fixture
def wobble_model(tmp_path: Path) -> Path:
    """Says mirror_wobble with probability ~0.84 for every frame (threshold 0.5)."""
    return constant_classifier(tmp_path / "wobble.onnx", [0.0, 2.0, -1.0])


@pytest.fixture
def frames_dir(tmp_path: Path) -> Path:
    """A night's folder: two readable frames (plain and tile-compressed) and two that are not frames."""
    night = tmp_path / "night"
    write_fits(night / "a.fits", generate_frame("good", 1, (96, 100)))
    write_fits(night / "b.fits.fz", generate_frame("shutter_fault", 2, (96, 100)))
    (night / "c.fits").write_bytes(b"this is not a FITS file\n" * 10)
    (night / "d.fits").write_bytes(b"")
    (night / "notes.txt").write_text("not looked at")
    return night
