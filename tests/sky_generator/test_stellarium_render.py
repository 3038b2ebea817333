"""Real Stellarium renders (small frames, a handful per process) whose geometry is proven: the bright
stars astropy predicts for each frame's observer, instant and camera are found where predicted, and the
same frames checked with latitude and longitude swapped fail. A hung or failing Stellarium fails its shard
with the reason and leaves no process behind; a missing Stellarium is one message saying what to install."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.errors import UserError
from services.sky_generator import stellarium
from services.sky_generator.geometry import check_frame, find_blobs
from services.sky_generator.job import Camera, Sample
from services.sky_generator.stellarium import RenderError, render, script

#: Boston-ish, a January night, looking south at Orion; and a southern-winter night in southern Africa,
#: looking east, stereographic. Longitudes within +-90 so that the swapped label is still a place.
CAMERAS = {
    "perspective": Camera(altitude=60, azimuth=180, fov=60, projection="perspective", width=480, height=360),
    "stereographic": Camera(
        altitude=45, azimuth=90, fov=100, projection="stereographic", width=480, height=360
    ),
}
PLACES = {
    "perspective": [
        (42.0 + i, -71.0 + 2 * i, datetime(2024, 1, 15, 3, 20 * i, tzinfo=UTC)) for i in range(3)
    ],
    "stereographic": [
        (-33.0 + 8 * i, 18.0 + 10 * i, datetime(2024, 6, 1 + i, 20, 0, tzinfo=UTC)) for i in range(3)
    ],
}


def _frames(projection: str, count: int = 3, *, atmosphere: bool = False) -> list[Sample]:
    c = CAMERAS[projection]
    return [
        Sample(
            f"test-{projection}",
            i,
            lat,
            lon,
            when,
            c.altitude,
            c.azimuth,
            c.fov,
            c.projection,
            c.width,
            c.height,
            atmosphere,
        )
        for i, (lat, lon, when) in enumerate(PLACES[projection][:count])
    ]


def _stellarium_processes(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True, check=False)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.parametrize("projection", sorted(CAMERAS))
def test_rendered_frames_put_the_bright_stars_where_astropy_says(projection: str, tmp_path: Path) -> None:
    frames = _frames(projection)
    appeared: list[str] = []
    paths = render(frames, tmp_path, on_frame=lambda p: appeared.append(p.name))
    assert appeared == [f.file_name for f in frames] and [p.name for p in paths] == appeared
    medians, worst = [], []
    for frame, path in zip(frames, paths, strict=True):
        proven = check_frame(path, frame)
        assert proven.passed(), (frame, proven.summary())
        assert len(proven.predicted) >= 5
        medians.append(proven.median_px)
        worst.append(proven.worst_px)
        # The label with latitude and longitude swapped (the original system's bug) does not pass.
        swapped = check_frame(path, frame, swapped=True)
        assert not swapped.passed(), (frame, swapped.summary())
    # Measured here: median 0.7-1.0 px, worst 1-9 px (stars closer than a disc merge into one blob).
    assert max(medians) < 2.0, medians


def test_the_script_passes_longitude_first_and_quits(tmp_path: Path) -> None:
    frame = replace(
        _frames("perspective", 1)[0], lat=42.5, lon=-71.25, time=datetime(2024, 1, 15, 3, 0, 7, tzinfo=UTC)
    )
    text = script([frame], tmp_path)
    assert 'core.setObserverLocation(-71.250000, 42.500000, 0, 0, "", "Earth");' in text
    assert 'core.setDate("2024-01-15T03:00:07", "utc");' in text
    assert "core.moveToAltAzi(60.000000, 180.000000, 0);" in text
    assert text.rstrip().endswith("core.quitStellarium();")
    with pytest.raises(ValueError, match="no colon"):
        script([replace(frame, job_id="a:b")], tmp_path)
    with pytest.raises(ValueError, match="share their camera"):
        script([frame, replace(frame, fov=30)], tmp_path)


def test_a_frame_that_does_not_come_fails_the_shard_and_kills_stellarium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stellarium, "SETTLE_S", 30.0)  # each frame now takes 30 s to be taken
    with pytest.raises(
        RenderError, match=r"frame 1 of 2 \(test-perspective-000000.png\) did not appear within 4 s"
    ):
        render(_frames("perspective", 2), tmp_path, startup_timeout_s=3, frame_timeout_s=1)
    assert not _stellarium_processes(str(tmp_path))
    assert not list(tmp_path.glob("*.png"))


def test_a_script_error_fails_the_shard_with_stellariums_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = stellarium.script

    def broken(*args: object, **kwargs: object) -> str:
        # A call Stellarium 0.22 does not have stops the script before core.quitStellarium().
        return "LandscapeMgr.setFlagCardinalsPoints(false);\n" + real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stellarium, "script", broken)
    with pytest.raises(RenderError, match="script failed before frame 1 of 1") as failed:
        render(_frames("perspective", 1), tmp_path, frame_timeout_s=20)
    assert "setFlagCardinalsPoints" in str(failed.value)
    assert not _stellarium_processes(str(tmp_path))


def test_a_missing_stellarium_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        UserError, match=r"stellarium and xvfb-run not found on PATH; install .*apt-get install"
    ):
        render(_frames("perspective", 1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_blobs_are_ranked_by_flux_not_by_their_saturated_peak() -> None:
    import numpy as np

    image = np.zeros((60, 80), np.float32)
    yy, xx = np.mgrid[0:60, 0:80]
    image[((xx - 20) ** 2 + (yy - 30) ** 2) <= 36] = 255  # a wide bright disc
    image[30, 60] = 255  # a one-pixel faint star, as saturated at its peak
    blobs = find_blobs(image, count=2)
    assert blobs[0, :2].round(1).tolist() == [20.0, 30.0]
    assert blobs[1, :2].round(1).tolist() == [60.0, 30.0] and blobs[0, 2] > 10 * blobs[1, 2]
