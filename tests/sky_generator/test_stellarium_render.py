"""Real Stellarium renders (small frames, a handful per process) whose geometry is proven: the bright
stars astropy predicts for each frame's observer, instant and camera are found where predicted, and the
same frames checked with latitude and longitude swapped fail. A hung or failing Stellarium fails its shard
with the reason and leaves no process behind; a missing Stellarium is one message saying what to install."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.errors import UserError
from services.sky_generator import stellarium
from services.sky_generator.geometry import Camera, check_frame, find_blobs
from services.sky_generator.stellarium import RenderError, Shot, View, render, script

#: Boston-ish, a January night, looking south at Orion; and a southern-winter night in southern Africa,
#: looking east, stereographic. Longitudes within +-90 so that the swapped label is still a place.
VIEWS = {
    "perspective": View(altitude=60, azimuth=180, fov=60, projection="perspective", width=480, height=360),
    "stereographic": View(
        altitude=45, azimuth=90, fov=100, projection="stereographic", width=480, height=360
    ),
}
SHOTS = {
    "perspective": [
        Shot(f"p{i}.png", 42.0 + i, -71.0 + 2 * i, datetime(2024, 1, 15, 3, 20 * i, tzinfo=UTC))
        for i in range(3)
    ],
    "stereographic": [
        Shot(f"s{i}.png", -33.0 + 8 * i, 18.0 + 10 * i, datetime(2024, 6, 1 + i, 20, 0, tzinfo=UTC))
        for i in range(3)
    ],
}


def _camera(view: View) -> Camera:
    return Camera(
        view.altitude, view.azimuth, view.fov, view.projection, view.width, view.height, view.atmosphere
    )


def _stellarium_processes(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True, check=False)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.parametrize("projection", sorted(VIEWS))
def test_rendered_frames_put_the_bright_stars_where_astropy_says(projection: str, tmp_path: Path) -> None:
    view, shots = VIEWS[projection], SHOTS[projection]
    appeared: list[str] = []
    paths = render(shots, view, tmp_path, on_frame=lambda p: appeared.append(p.name))
    assert appeared == [s.name for s in shots] and [p.name for p in paths] == appeared
    medians, worst = [], []
    for shot, path in zip(shots, paths, strict=True):
        proven = check_frame(path, shot.lat, shot.lon, shot.time, _camera(view))
        assert proven.passed(), (shot, proven.summary())
        assert len(proven.predicted) >= 5
        medians.append(proven.median_px)
        worst.append(proven.worst_px)
        # The label with latitude and longitude swapped (the original system's bug) does not pass.
        swapped = check_frame(path, shot.lon, shot.lat, shot.time, _camera(view))
        assert not swapped.passed(), (shot, swapped.summary())
    # Measured here: median 0.7-1.0 px, worst 1-9 px (stars closer than a disc merge into one blob).
    assert max(medians) < 2.0, medians


def test_the_script_passes_longitude_first_and_quits(tmp_path: Path) -> None:
    shot = Shot("one.png", 42.5, -71.25, datetime(2024, 1, 15, 3, 0, 7, tzinfo=UTC))
    text = script([shot], VIEWS["perspective"], tmp_path)
    assert 'core.setObserverLocation(-71.250000, 42.500000, 0, 0, "", "Earth");' in text
    assert 'core.setDate("2024-01-15T03:00:07", "utc");' in text
    assert text.rstrip().endswith("core.quitStellarium();")
    with pytest.raises(ValueError, match="no colon"):
        script([Shot("a:b.png", 0, 0, shot.time)], VIEWS["perspective"], tmp_path)


def test_a_frame_that_does_not_come_fails_the_shard_and_kills_stellarium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stellarium, "SETTLE_S", 30.0)  # each frame now takes 30 s to be taken
    with pytest.raises(RenderError, match=r"frame 1 of 2 \(p0.png\) did not appear within 4 s"):
        render(
            SHOTS["perspective"][:2], VIEWS["perspective"], tmp_path, startup_timeout_s=3, frame_timeout_s=1
        )
    assert not _stellarium_processes("tessera-stellarium-")
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
        render(SHOTS["perspective"][:1], VIEWS["perspective"], tmp_path, frame_timeout_s=20)
    assert "setFlagCardinalsPoints" in str(failed.value)
    assert not _stellarium_processes("tessera-stellarium-")


def test_a_missing_stellarium_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        UserError, match=r"stellarium and xvfb-run not found on PATH; install .*apt-get install"
    ):
        render(SHOTS["perspective"][:1], VIEWS["perspective"], tmp_path / "out")
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
