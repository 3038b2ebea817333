"""The sky job: the shipped sample parses and round-trips; frames are reproducible per (seed, index), lie in
the bounds and are uniform by area; every bad job file is refused with the JSON path of what is wrong."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from services.errors import UserError
from services.sky_generator.job import (
    SAMPLE_JOB,
    SCHEMA,
    Camera,
    Sample,
    SkyJob,
    all_samples,
    load_job_file,
    parse_job,
    samples,
)
from services.sky_generator.sun import NIGHT_SUN_ALTITUDE, sun_altitude

GOOD: dict[str, Any] = {
    "schema": SCHEMA,
    "job_id": "test-sky",
    "count": 120,
    "seed": 11,
    "latitude": [-20.0, 35.5],
    "longitude": [10, 40],
    "time": ["2024-03-01T18:00:00Z", "2024-03-02T06:00:00Z"],
    "camera": {"altitude": 45, "azimuth": 90, "fov": 50.5, "projection": "stereographic", "size": [256, 128]},
    "atmosphere": True,
    "frames_per_shard": 25,
    "output": "/tmp/skies",
}


def job_with(**changes: Any) -> SkyJob:
    body = copy.deepcopy(GOOD)
    body.update(changes)
    return parse_job(body)


def in_band(lon: float, low: float, high: float) -> bool:
    return low <= lon <= high if low < high else lon >= low or lon <= high


# --- the sample file, parsing, round trips ---------------------------------------------------------------


def test_the_shipped_sample_job_parses() -> None:
    job = load_job_file(SAMPLE_JOB)
    assert job.job_id == "gulf-of-maine-jan"
    assert (job.count, job.seed, job.frames_per_shard, job.shards) == (400, 7, 50, 8)
    assert job.lat_range == (41.0, 45.0) and job.lon_range == (-71.0, -66.0)
    assert job.time_range == (datetime(2024, 1, 15, 1, tzinfo=UTC), datetime(2024, 1, 15, 9, tzinfo=UTC))
    assert job.camera == Camera(60.0, 180.0, 60.0, "perspective", 640, 480)
    assert job.atmosphere is False
    assert job.output.startswith("s3://")
    # The same file, read as text or as a path string, is the same job.
    assert parse_job(SAMPLE_JOB.read_text()) == job == load_job_file(str(SAMPLE_JOB))


def test_to_json_round_trips_as_a_mapping_and_as_queue_text() -> None:
    for job in (load_job_file(SAMPLE_JOB), job_with(), job_with(longitude=[170, -170.25])):
        body = job.to_json()
        assert body["schema"] == SCHEMA
        text = json.dumps(body)  # what goes on the queue
        assert parse_job(body) == job
        assert parse_job(text) == job
        assert parse_job(text.encode()) == job
        assert parse_job(yaml.safe_dump(body)) == job


def test_a_tiny_float_survives_json_text() -> None:
    # YAML 1.1 reads 1e-05 as a string: JSON text is read as JSON first.
    job = job_with(latitude=[0.00001, 0.5])
    assert json.dumps(job.to_json()).count("1e-05") == 1
    assert parse_job(json.dumps(job.to_json())) == job


def test_defaults_and_a_fresh_job_id() -> None:
    body = {k: v for k, v in GOOD.items() if k not in ("job_id", "atmosphere", "frames_per_shard", "schema")}
    first, second = parse_job(body), parse_job(body)
    assert first.job_id != second.job_id and len(first.job_id) == 32
    assert first.atmosphere is False and first.frames_per_shard == 50
    assert first.shards == 3  # ceil(120 / 50)


def test_times_become_utc_whatever_way_they_are_written() -> None:
    expected = (datetime(2024, 1, 15, 1, tzinfo=UTC), datetime(2024, 1, 15, 9, tzinfo=UTC))
    # An offset converted to UTC; a naive time read as UTC.
    assert job_with(time=["2024-01-15T03:00:00+02:00", "2024-01-15T09:00:00"]).time_range == expected
    # Unquoted in YAML, the instants arrive as datetimes.
    text = yaml.safe_dump({**GOOD, "time": None}).replace(
        "time: null", "time: [2024-01-15T01:00:00Z, 2024-01-15 04:00:00-05:00]"
    )
    parsed = parse_job(text).time_range
    assert parsed == expected and all(t.tzinfo is UTC for t in parsed)


def test_shard_counts() -> None:
    assert job_with(count=100, frames_per_shard=50).shards == 2
    assert job_with(count=101, frames_per_shard=50).shards == 3
    assert job_with(count=1, frames_per_shard=1000).shards == 1
    job = job_with(count=101, frames_per_shard=50)
    assert [len(samples(job, k)) for k in range(job.shards)] == [50, 50, 1]
    assert [s.index for s in samples(job, 2)] == [100]
    for shard in (-1, 3, True, 1.0):
        with pytest.raises(UserError, match="shard"):
            samples(job, shard)  # type: ignore[arg-type]


# --- reproducibility ---------------------------------------------------------------------------------------


def test_the_same_seed_gives_identical_samples() -> None:
    assert all_samples(job_with()) == all_samples(job_with())
    assert all_samples(load_job_file(SAMPLE_JOB)) == all_samples(load_job_file(SAMPLE_JOB))


def test_a_shard_alone_equals_its_frames_in_all_samples_in_any_order() -> None:
    job = job_with(count=103, frames_per_shard=10)
    everything = all_samples(job)
    assert [s.index for s in everything] == list(range(103))
    for shard in reversed(range(job.shards)):  # asked last-first
        alone = samples(job, shard)
        assert alone == everything[shard * 10 : shard * 10 + 10]
    assert [s for k in range(job.shards) for s in samples(job, k)] == everything


def test_shard_size_and_count_do_not_change_any_frame() -> None:
    reference = all_samples(job_with(count=120, frames_per_shard=25))
    for per_shard in (1, 7, 50, 1000):
        job = job_with(count=120, frames_per_shard=per_shard)
        frames = [s for k in range(job.shards) for s in samples(job, k)]
        assert frames == reference
    # A bigger job begins with the same frames.
    assert all_samples(job_with(count=300))[:120] == reference


def test_different_seeds_differ() -> None:
    one, other = all_samples(job_with(seed=11)), all_samples(job_with(seed=12))
    assert all(a.lat != b.lat and a.lon != b.lon for a, b in zip(one, other, strict=True))
    assert sum(a.time != b.time for a, b in zip(one, other, strict=True)) > 100
    # Neighbouring frames of one seed are not copies of each other either.
    assert len({(s.lat, s.lon) for s in one}) == len(one)


# --- bounds and distribution -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latitude", "longitude"),
    [
        ([41.0, 45.0], [-71.0, -66.0]),
        ([-90, 90], [-180, 180]),
        ([-10, -9.999], [0, 0.001]),
        ([60, 89.5], [170, -170]),  # across the antimeridian
        ([-5, 5], [-179.5, -180]),  # almost the whole way round, across it
        ([10, 20], [100, -180]),  # up to the antimeridian, written from the east
    ],
)
def test_every_sample_lies_within_the_bounds(latitude: list[float], longitude: list[float]) -> None:
    # night: false here, so that polar summers and daylit bands are sampled too (the night rule is below).
    job = job_with(count=2000, latitude=latitude, longitude=longitude, night=False)
    start, end = job.time_range
    frames = all_samples(job)
    for s in frames:
        assert latitude[0] <= s.lat <= latitude[1]
        assert -180.0 <= s.lon <= 180.0 and in_band(s.lon, *longitude)
        assert start <= s.time < end and s.time.microsecond == 0 and s.time.tzinfo is UTC
        assert (s.altitude, s.azimuth, s.fov, s.projection) == (45.0, 90.0, 50.5, "stereographic")
        assert (s.width, s.height, s.atmosphere) == (256, 128, True)
        assert s.camera == job.camera
    if longitude == [170, -170]:
        east = sum(s.lon >= 170 for s in frames) / len(frames)
        assert 0.4 < east < 0.6  # both sides of the antimeridian, evenly


def test_latitude_is_uniform_by_area_not_by_degree() -> None:
    n = 20_000
    body = {
        "count": n,
        "frames_per_shard": 1000,
        "latitude": [0, 90],
        "longitude": [-180, 180],
        "night": False,
    }
    frames = all_samples(job_with(**body))
    above_30 = sum(s.lat > 30 for s in frames) / n
    # The cap above 30 degrees is half the hemisphere's area (sin 30 = 0.5); uniform-in-degree gives 2/3.
    # One standard deviation is sqrt(0.25 / 20000) = 0.0035.
    assert abs(above_30 - 0.5) < 0.02, above_30
    # The whole distribution: sin(lat) is uniform on [0, 1] (each decile within ~5 sigma of 10 %).
    deciles = [0] * 10
    for s in frames:
        deciles[min(9, int(math.sin(math.radians(s.lat)) * 10))] += 1
    assert all(abs(d / n - 0.1) < 0.011 for d in deciles), deciles


def test_longitude_and_time_are_uniform() -> None:
    n = 20_000
    job = job_with(count=n, frames_per_shard=1000, longitude=[150, -150], night=False)  # a 60-degree band
    frames = all_samples(job)
    start, end = job.time_range
    span = (end - start).total_seconds()
    lon_bins, time_bins = [0] * 6, [0] * 6
    for s in frames:
        lon_bins[min(5, int(((s.lon - 150) % 360) / 10))] += 1
        time_bins[min(5, int((s.time - start).total_seconds() / span * 6))] += 1
    for bins in (lon_bins, time_bins):
        assert all(abs(b / n - 1 / 6) < 0.015 for b in bins), bins


def test_times_are_whole_seconds_even_from_fractional_bounds() -> None:
    job = job_with(count=500, time=["2024-01-01T00:00:00.5Z", "2024-01-01T00:00:03.5Z"])
    seen = {s.time for s in all_samples(job)}
    # The whole seconds in [00:00:00.5, 00:00:03.5): 1, 2 and 3.
    assert seen == {datetime(2024, 1, 1, 0, 0, k, tzinfo=UTC) for k in (1, 2, 3)}
    one_second = job_with(count=50, time=["2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z"])
    assert {s.time for s in all_samples(one_second)} == {datetime(2024, 1, 1, tzinfo=UTC)}


# --- names and labels --------------------------------------------------------------------------------------


def test_file_names_have_no_colons_and_are_unique() -> None:
    frames = all_samples(job_with(count=1000, frames_per_shard=100))
    names = [s.file_name for s in frames]
    assert len(set(names)) == len(names)
    assert not any(":" in name for name in names)
    assert names[0] == "test-sky-000000.png" and names[-1] == "test-sky-000999.png"
    assert all(name.endswith(".png") and "/" not in name for name in names)
    label = frames[3].to_json()
    assert label["file"] == names[3] and label["time"].endswith("Z")
    assert json.loads(json.dumps(label)) == label


def test_sample_is_frozen() -> None:
    sample: Sample = samples(job_with(), 0)[0]
    with pytest.raises(AttributeError):
        sample.lat = 0.0  # type: ignore[misc]


# --- bad job files -----------------------------------------------------------------------------------------


def without(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        for key in keys:
            body.pop(key)

    return change


def setting(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.update(fields)


def camera(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda body: body["camera"].update(fields)


def no_camera_field(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body["camera"].pop(key)


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # (case, change to GOOD, the JSON path named, more of the message)
    ("latitude a string", setting(latitude="north"), "$.latitude", "[low, high]"),
    ("latitude one number", setting(latitude=[41.0]), "$.latitude", "[low, high]"),
    ("latitude inverted", setting(latitude=[45, 41]), "$.latitude", "below"),
    ("latitude low == high", setting(latitude=[41, 41]), "$.latitude", "below"),
    ("latitude beyond the pole", setting(latitude=[-95, 10]), "$.latitude[0]", "-90..90"),
    ("latitude a string inside", setting(latitude=[10, "20"]), "$.latitude[1]", "the string '20'"),
    ("latitude NaN", setting(latitude=[float("nan"), 10]), "$.latitude[0]", "-90..90"),
    ("longitude low == high", setting(longitude=[12, 12]), "$.longitude", "width"),
    ("longitude out of range", setting(longitude=[-200, 0]), "$.longitude[0]", "-180..180"),
    ("longitude zero-width wrap", setting(longitude=[180, -180]), "$.longitude", "width"),
    ("count 0", setting(count=0), "$.count", "1..1000000"),
    ("count 10^9", setting(count=10**9), "$.count", "1..1000000"),
    ("count a boolean", setting(count=True), "$.count", "a boolean"),
    ("count a fraction", setting(count=4.5), "$.count", "whole number"),
    ("count missing", without("count"), "$.count", "required"),
    ("seed negative", setting(seed=-1), "$.seed", ">= 0"),
    ("seed a string", setting(seed="seven"), "$.seed", "the string 'seven'"),
    ("seed missing", without("seed"), "$.seed", "required"),
    ("time inverted", setting(time=["2024-01-15T09:00:00Z", "2024-01-15T01:00:00Z"]), "$.time", "before"),
    (
        "time start == end",
        setting(time=["2024-01-15T01:00:00Z", "2024-01-15T03:00:00+02:00"]),
        "$.time",
        "before",
    ),
    ("time not a date", setting(time=["yesterday", "2024-01-15T01:00:00Z"]), "$.time[0]", "ISO-8601"),
    (
        "time a number",
        setting(time=[1705280400, "2024-01-15T09:00:00Z"]),
        "$.time[0]",
        "the number 1705280400",
    ),
    (
        "time under a second",
        setting(time=["2024-01-01T00:00:00.2Z", "2024-01-01T00:00:00.7Z"]),
        "$.time",
        "whole second",
    ),
    ("time missing", without("time"), "$.time", "required"),
    ("fov 0", camera(fov=0), "$.camera.fov", "0 < fov < 180, got the number 0"),
    ("fov 180", camera(fov=180), "$.camera.fov", "0 < fov < 180, got the number 180"),
    ("fov 200", camera(fov=200), "$.camera.fov", "must be a number 0 < fov < 180, got the number 200"),
    ("fov a boolean", camera(fov=True), "$.camera.fov", "a boolean"),
    ("fov missing", no_camera_field("fov"), "$.camera.fov", "required"),
    ("altitude below the horizon", camera(altitude=-1), "$.camera.altitude", "0..90"),
    ("altitude a string", camera(altitude="high"), "$.camera.altitude", "the string 'high'"),
    ("azimuth 360", camera(azimuth=360), "$.camera.azimuth", "0 <= azimuth < 360"),
    ("bad projection", camera(projection="fisheye"), "$.camera.projection", "perspective, stereographic"),
    ("size too small", camera(size=[32, 480]), "$.camera.size", "64..4096"),
    ("size too large", camera(size=[640, 5000]), "$.camera.size", "64..4096"),
    ("size one number", camera(size=640), "$.camera.size", "[width, height]"),
    ("size fractional", camera(size=[640.5, 480]), "$.camera.size", "whole numbers"),
    ("unknown camera field", camera(roll=5), "$.camera.roll", "unknown field"),
    ("camera a list", setting(camera=[60, 180]), "$.camera", "must be a mapping"),
    ("camera missing", without("camera"), "$.camera", "required"),
    ("unknown field", setting(colour="blue"), "$.colour", "unknown field"),
    ("atmosphere a string", setting(atmosphere="off"), "$.atmosphere", "true or false"),
    ("frames_per_shard 0", setting(frames_per_shard=0), "$.frames_per_shard", "1..1000"),
    ("frames_per_shard 1001", setting(frames_per_shard=1001), "$.frames_per_shard", "1..1000"),
    ("output missing", without("output"), "$.output", "required"),
    ("output a number", setting(output=3), "$.output", "the number 3"),
    ("output empty", setting(output="  "), "$.output", "s3://"),
    (
        "output a bad bucket",
        setting(output="s3://Bad_Bucket/x"),
        "$.output",
        "bucket name 'Bad_Bucket' is not a valid",
    ),
    ("schema unknown", setting(schema="tessera.sky-job/v9"), "$.schema", "tessera.sky-job/v1"),
    ("job_id with a colon", setting(job_id="sky:1"), "$.job_id", "letters, digits"),
]


@pytest.mark.parametrize(("change", "path", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_job_file_is_refused_with_its_json_path(
    change: Callable[[dict[str, Any]], None], path: str, message: str, tmp_path: Path
) -> None:
    body = copy.deepcopy(GOOD)
    change(body)
    file = tmp_path / "job.yaml"
    file.write_text(yaml.safe_dump(body))  # through YAML, as a researcher's file is read
    with pytest.raises(UserError) as refused:
        load_job_file(file)
    text = str(refused.value)
    assert f"{path}: " in text, text
    assert message in text, text
    assert "has a problem:" in text, text  # exactly this one problem, not a cascade
    # The mapping itself is refused the same way.
    with pytest.raises(UserError, match=re.escape(f"{path}: ")):
        parse_job(body)


def test_the_bad_table_covers_enough() -> None:
    assert len(BAD) >= 15
    assert {"$.latitude", "$.longitude", "$.count", "$.time", "$.camera.fov", "$.output"} <= {
        b[2] for b in BAD
    }


def test_every_problem_comes_in_one_error() -> None:
    body = copy.deepcopy(GOOD)
    body.update(count=10**9, latitude=[45, 41], output=None, extra=1)
    body["camera"].update(fov=200, projection="fisheye")
    with pytest.raises(UserError) as refused:
        parse_job(body)
    text = str(refused.value)
    assert "has 6 problems" in text
    for path in ("$.count", "$.latitude", "$.output", "$.extra", "$.camera.fov", "$.camera.projection"):
        assert f"{path}: " in text
    assert "1..1000000, got the number 1000000000" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("count: [1, 2\nseed: 3\n", "is not YAML"),
        ("count: 1\n  seed: 2\n:", "is not YAML"),
        (b"\xff\xfe\x00count", "is not YAML"),
        ("- count\n- seed\n", "must be a YAML mapping of fields, got a list"),
        ("just some words", "must be a YAML mapping of fields, got the string 'just some words'"),
        ("", "must be a YAML mapping of fields, got null"),
        ("42", "got the number 42"),
    ],
    ids=["unclosed list", "bad indentation", "not UTF-8", "a list", "a scalar", "empty", "a number"],
)
def test_a_file_that_is_not_a_yaml_mapping_is_refused(
    content: str | bytes, message: str, tmp_path: Path
) -> None:
    file = tmp_path / "job.yaml"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    with pytest.raises(UserError, match="the sky job file") as refused:
        load_job_file(file)
    assert message in str(refused.value)
    with pytest.raises(UserError, match="the sky job "):
        parse_job(content)


def test_a_missing_or_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"job\.yaml does not exist"):
        load_job_file(tmp_path / "job.yaml")
    with pytest.raises(UserError, match="cannot read the sky job file"):
        load_job_file(tmp_path)  # a directory


def test_the_count_limit_is_refused_at_parse_time() -> None:
    # A job is refused at parse time, so nothing downstream ever sees a count past the limit.
    with pytest.raises(UserError, match=r"\$\.count: must be a whole number 1\.\.1000000"):
        job_with(count=1_000_001)
    assert job_with(count=1_000_000, frames_per_shard=1000).shards == 1000


def test_the_last_frame_of_the_largest_job() -> None:
    job = job_with(count=1_000_000, frames_per_shard=1000)
    last = samples(job, 999)
    assert [s.index for s in last] == list(range(999_000, 1_000_000))
    assert last[-1].file_name == "test-sky-999999.png"
    assert samples(job_with(count=1_000_000, frames_per_shard=7), 999_999 // 7)[-1] == last[-1]
    assert last[-1].time - job.time_range[0] < timedelta(hours=12)


# --- night: the Sun at least 12 degrees down -------------------------------------------------------------


def test_night_frames_have_the_sun_well_below_their_horizon() -> None:
    job = job_with(
        count=500,
        latitude=[30, 50],
        longitude=[-10, 10],
        time=["2024-03-01T00:00:00Z", "2024-03-03T00:00:00Z"],
    )
    assert job.night  # the default
    frames = all_samples(job)
    altitudes = sun_altitude(
        np.array([f.lat for f in frames]),
        np.array([f.lon for f in frames]),
        np.array([f.time.timestamp() for f in frames]),
    )
    assert altitudes.max() <= NIGHT_SUN_ALTITUDE
    # Two whole days, about 40 % nautical night here: the rule picked nights, not a cut of the range.
    hours = {f.time.hour for f in frames}
    assert hours <= set(range(0, 7)) | set(range(18, 24)) and len(hours) >= 8
    assert all_samples(job) == frames  # reproducible, like every other draw
    daytime = all_samples(replace(job, night=False))
    assert [(f.lat, f.lon) for f in daytime] == [(f.lat, f.lon) for f in frames]  # only the instants move


def test_a_time_range_without_night_is_refused_with_the_fix() -> None:
    # Tromso-ish in midsummer: the Sun never sets.
    job = job_with(
        count=3, latitude=[69, 70], longitude=[18, 19], time=["2024-06-21T00:00:00Z", "2024-06-22T00:00:00Z"]
    )
    with pytest.raises(
        UserError, match=r"found no night .* widen \$\.time or \$\.latitude, or set night: false"
    ):
        samples(job, 0)
    assert len(samples(replace(job, night=False), 0)) == 3
