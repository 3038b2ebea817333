"""The sky job: which night skies to render, read from a YAML file, and the frames it stands for.

A researcher writes a job file (YAML, or JSON, which is what :meth:`SkyJob.to_json` puts on a queue)::

    schema: tessera.sky-job/v1
    job_id: gulf-of-maine-jan        # optional: a fresh id when absent
    count: 400                       # frames, 1..1000000
    seed: 7                          # a whole number >= 0
    latitude: [41.0, 45.0]           # degrees -90..90, low < high
    longitude: [-71.0, -66.0]        # degrees -180..180; [170, -170] crosses the antimeridian
    time: ["2024-01-15T01:00:00Z", "2024-01-15T09:00:00Z"]   # UTC; offsets converted, naive = UTC
    camera:
      altitude: 60                   # degrees 0..90 above the horizon the camera points
      azimuth: 180                   # degrees 0..<360, 0 = north, 90 = east
      fov: 60                        # degrees, 0 < fov < 180 (Stellarium's: vertical)
      projection: perspective        # perspective or stereographic
      size: [640, 480]               # pixels [width, height], each 64..4096
    atmosphere: false                # optional (default false): render without atmosphere
    night: true                      # optional (default true): only instants when the Sun is 12 deg down
    frames_per_shard: 50             # optional (default 50), 1..1000
    output: s3://bucket/prefix       # an s3:// URL or a local directory

Every problem is reported with its JSON path in one :class:`~services.errors.UserError`
(``$.camera.fov: must be a number 0 < fov < 180, got the number 200``), like every other document of the
platform (:mod:`services.jobs.documents`).

Frames: frame ``index`` (``0 .. count - 1``) draws from its own generator,
``numpy.random.default_rng([seed, index])``, so it depends only on the seed and its index: never on the
shard size, the count or the order shards are rendered in. Its observer is area-uniform on the sphere
within the bounds (``sin(latitude)`` uniform between the sines of the bounds; longitude uniform in the
band, wrapped across the antimeridian when written low > high, and normalised to -180..180); its instant
is uniform over the whole UTC seconds in ``[start, end)`` -- with ``night`` (the default), the first of
the frame's candidate instants (drawn one after another from its generator) at which the Sun is at least
12 degrees below the frame's horizon (nautical night: the bright stars are out), so that every frame is a
night sky even with an atmosphere. Shard ``k`` holds frames
``k * frames_per_shard .. min(count, (k + 1) * frames_per_shard) - 1``.

This module stays one file (~570 lines): it is the ``tessera.sky-job/v1`` contract, the document above, its
checker and the frames it stands for, and the frames are drawn from exactly the fields the checker admits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.errors import UserError
from services.jobs import trust
from services.jobs.documents import DocumentChecker, is_int, kind, s3_url_problem
from services.sky_generator.sun import NIGHT_SUN_ALTITUDE, sun_altitude

SCHEMA = "tessera.sky-job/v1"
#: The sample job shipped with the package (``tessera`` docs and tests read it).
SAMPLE_JOB = Path(__file__).with_name("sample-job.yaml")
PROJECTIONS = ("perspective", "stereographic")
MAX_COUNT = 1_000_000
MAX_FRAMES_PER_SHARD = 1000
DEFAULT_FRAMES_PER_SHARD = 50
MIN_SIDE, MAX_SIDE = 64, 4096
_TOP = (
    "schema",
    "job_id",
    "count",
    "seed",
    "latitude",
    "longitude",
    "time",
    "camera",
    "atmosphere",
    "night",
    "frames_per_shard",
    "output",
)
_CAMERA = ("altitude", "azimuth", "fov", "projection", "size")
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class Camera:
    """Where the camera points (degrees; azimuth 0 = north, 90 = east) and what it sees."""

    altitude: float
    azimuth: float
    fov: float
    projection: str
    width: int
    height: int


@dataclass(frozen=True)
class Sample:
    """One frame: the observer, the UTC instant and the camera; what its label says."""

    job_id: str
    index: int
    lat: float
    lon: float
    time: datetime  # UTC, whole seconds
    altitude: float
    azimuth: float
    fov: float
    projection: str
    width: int
    height: int
    atmosphere: bool

    @property
    def file_name(self) -> str:
        """The frame's PNG file name, unique within its job (no colons: safe in S3 keys and any file
        system)."""
        return f"{self.job_id}-{self.index:06d}.png"

    @property
    def camera(self) -> Camera:
        """The frame's camera."""
        return Camera(self.altitude, self.azimuth, self.fov, self.projection, self.width, self.height)

    def to_json(self) -> dict[str, Any]:
        """The frame's label as JSON."""
        return {
            "job_id": self.job_id,
            "index": self.index,
            "file": self.file_name,
            "lat": self.lat,
            "lon": self.lon,
            "time": _iso(self.time),
            "camera": _camera_json(self.camera),
            "atmosphere": self.atmosphere,
        }


@dataclass(frozen=True)
class SkyJob:
    """A validated sky job (see the module doc)."""

    job_id: str
    count: int
    seed: int
    lat_range: tuple[float, float]  # low < high
    #: ``(low, high)``; low > high is a band across the antimeridian (from low east to high).
    lon_range: tuple[float, float]
    time_range: tuple[datetime, datetime]  # UTC, start < end
    camera: Camera
    atmosphere: bool
    frames_per_shard: int
    output: str
    #: Only instants when the Sun is at least 12 degrees below the frame's horizon.
    night: bool = True

    @property
    def shards(self) -> int:
        """How many shards the frames make: ``ceil(count / frames_per_shard)``."""
        return -(-self.count // self.frames_per_shard)

    def to_json(self) -> dict[str, Any]:
        """The job as JSON, every default written out; :func:`parse_job` reads it back to an equal job."""
        return {
            "schema": SCHEMA,
            "job_id": self.job_id,
            "count": self.count,
            "seed": self.seed,
            "latitude": list(self.lat_range),
            "longitude": list(self.lon_range),
            "time": [_iso(t) for t in self.time_range],
            "camera": _camera_json(self.camera),
            "atmosphere": self.atmosphere,
            "night": self.night,
            "frames_per_shard": self.frames_per_shard,
            "output": self.output,
        }


def parse_job(data: str | bytes | Mapping[str, Any]) -> SkyJob:
    """Validate a sky job: YAML or JSON text, or an already loaded mapping; UserError lists every problem."""
    return _parse(data, "the sky job")


def load_job_file(path: str | os.PathLike[str]) -> SkyJob:
    """Read and validate the sky job file at ``path``; UserError when it is missing, unreadable or bad."""
    what = f"the sky job file {os.fspath(path)}"
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror or exc}") from None
    return _parse(text, what)


def samples(job: SkyJob, shard: int) -> list[Sample]:
    """The frames of shard ``shard`` (``0 .. job.shards - 1``), in index order.

    Frame ``index`` draws three numbers from ``numpy.random.default_rng([seed, index])``, so it is the same
    whichever shard size, count or shard order: ``sin(latitude)`` uniform between the sines of the
    latitude bounds (uniform by area on the sphere, not by degree), longitude uniform in the band (across
    the antimeridian when written low > high; normalised to -180..180) and the instant uniform over the
    whole UTC seconds in ``[start, end)``.
    """
    if not is_int(shard) or not 0 <= shard < job.shards:
        raise UserError(
            f"shard must be a whole number 0..{job.shards - 1} for job {job.job_id}, got {shard!r}"
        )
    first = shard * job.frames_per_shard
    last = min(job.count, first + job.frames_per_shard)
    return [_sample(job, index) for index in range(first, last)]


def all_samples(job: SkyJob) -> list[Sample]:
    """Every frame of the job, in index order (the shards' frames one after another)."""
    return [_sample(job, index) for index in range(job.count)]


#: Candidate instants a frame draws (in blocks of this many) before its time bounds are judged nightless.
NIGHT_TRIES = 256
_NIGHT_BLOCK = 16


def _sample(job: SkyJob, index: int) -> Sample:
    rng = np.random.default_rng([job.seed, index])
    u_lat, u_lon, u_time = (float(u) for u in rng.random(3))
    lat_lo, lat_hi = job.lat_range
    sin_lo, sin_hi = math.sin(math.radians(lat_lo)), math.sin(math.radians(lat_hi))
    lat = math.degrees(math.asin(sin_lo + u_lat * (sin_hi - sin_lo)))
    lat = min(max(lat, lat_lo), lat_hi)  # asin(sin(x)) may miss x by an ulp
    lon_lo = job.lon_range[0]
    lon = lon_lo + u_lon * _lon_width(*job.lon_range)
    if lon > 180.0:
        lon -= 360.0
    first, seconds = _whole_seconds(*job.time_range)
    offset = min(int(u_time * seconds), seconds - 1)
    if job.night:
        offset = _night_offset(job, index, rng, lat, lon, first, seconds, offset)
    when = first + timedelta(seconds=offset)
    camera = job.camera
    return Sample(
        job_id=job.job_id,
        index=index,
        lat=lat,
        lon=lon,
        time=when,
        altitude=camera.altitude,
        azimuth=camera.azimuth,
        fov=camera.fov,
        projection=camera.projection,
        width=camera.width,
        height=camera.height,
        atmosphere=job.atmosphere,
    )


def _night_offset(  # noqa: PLR0917 - one frame's draw, passed on
    job: SkyJob,
    index: int,
    rng: np.random.Generator,
    lat: float,
    lon: float,
    first: datetime,
    seconds: int,
    offset: int,
) -> int:
    """The first of the frame's candidate instants (seconds after ``first``) with the Sun at least 12 degrees
    below its horizon; UserError when :data:`NIGHT_TRIES` candidates hold none."""
    start = first.timestamp()
    candidates = np.array([offset])
    for _ in range(NIGHT_TRIES // _NIGHT_BLOCK):
        night = sun_altitude(lat, lon, start + candidates) <= NIGHT_SUN_ALTITUDE
        if night.any():
            return int(candidates[int(np.argmax(night))])
        candidates = np.minimum((rng.random(_NIGHT_BLOCK) * seconds).astype(np.int64), seconds - 1)
    raise UserError(
        f"frame {index} of job {job.job_id} at latitude {lat:.2f}, longitude {lon:.2f} found no night (the "
        f"Sun {-NIGHT_SUN_ALTITUDE:g} degrees below the horizon) in {NIGHT_TRIES} instants of $.time; widen "
        "$.time or $.latitude, or set night: false"
    )


def _lon_width(low: float, high: float) -> float:
    """Degrees of longitude from ``low`` east to ``high`` (across the antimeridian when low > high; none when
    they are equal)."""
    return high - low if low <= high else high - low + 360.0


def _whole_seconds(start: datetime, end: datetime) -> tuple[datetime, int]:
    """The first whole second at or after ``start``, and how many whole seconds lie in ``[start, end)``."""
    first = start + (-start.microsecond % 1_000_000) * timedelta(microseconds=1)
    micro = (end - first) // timedelta(microseconds=1)
    return first, max(0, -(-micro // 1_000_000))


def _iso(when: datetime) -> str:
    """A UTC instant as ISO-8601 with ``Z``."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _camera_json(camera: Camera) -> dict[str, Any]:
    return {
        "altitude": camera.altitude,
        "azimuth": camera.azimuth,
        "fov": camera.fov,
        "projection": camera.projection,
        "size": [camera.width, camera.height],
    }


def _load(data: str | bytes | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    """``data`` as a mapping: text is read as JSON, else as YAML (YAML 1.1 reads ``1e-05`` as a string)."""
    document: Any = data
    if isinstance(document, bytes):
        try:
            document = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{what} is not YAML: not UTF-8 text ({exc})") from None
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            try:
                document = yaml.safe_load(document)
            except yaml.YAMLError as exc:
                raise UserError(f"{what} is not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(document, Mapping):
        raise UserError(f"$: {what} must be a YAML mapping of fields, got {_kind(document)}")
    return document


def _parse(data: str | bytes | Mapping[str, Any], what: str) -> SkyJob:
    return _Checker(what, trust.policy_in_force()).job(_load(data, what))


def _kind(value: Any) -> str:
    """:func:`~services.jobs.documents.kind`, knowing the dates and times YAML reads unquoted."""
    if isinstance(value, date):
        return f"the {'time' if isinstance(value, datetime) else 'date'} {value.isoformat()}"
    return kind(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Checker(DocumentChecker):
    """The sky job's fields (see the module doc), under ``policy`` (a queue worker's confines ``output``)."""

    def __init__(self, what: str, policy: trust.TrustPolicy) -> None:
        super().__init__(what)
        self.policy = policy

    def job(self, data: Mapping[str, Any]) -> SkyJob:
        job_id = self.header(data, fields=_TOP, schema=SCHEMA, reader="this sky generator")
        count = self.whole("$.count", data.get("count"), 1, MAX_COUNT, "the number of frames")
        seed = self.seed(data.get("seed"))
        lat = self.latitude(data.get("latitude"))
        lon = self.longitude(data.get("longitude"))
        times = self.times(data.get("time"))
        camera = self.camera(data.get("camera"))
        atmosphere = data.get("atmosphere", False)
        if not isinstance(atmosphere, bool):
            self.problem("$.atmosphere", f"must be true or false, got {_kind(atmosphere)}")
        night = data.get("night", True)
        if not isinstance(night, bool):
            self.problem("$.night", f"must be true or false, got {_kind(night)}")
        per_shard = self.whole(
            "$.frames_per_shard",
            data.get("frames_per_shard", DEFAULT_FRAMES_PER_SHARD),
            1,
            MAX_FRAMES_PER_SHARD,
            "frames per shard",
        )
        output = self.output(data.get("output"))
        self.done()
        # done() raised if any field was missing or bad.
        assert count and per_shard and seed is not None and lat and lon and times and camera and output
        return SkyJob(
            job_id=job_id,
            count=count,
            seed=seed,
            lat_range=lat,
            lon_range=lon,
            time_range=times,
            camera=camera,
            atmosphere=atmosphere,
            frames_per_shard=per_shard,
            output=output,
            night=night,
        )

    def seed(self, value: Any) -> int | None:
        if value is None:
            self.problem("$.seed", "required: a whole number >= 0 (the same seed gives the same frames)")
            return None
        if not is_int(value) or value < 0:
            self.problem("$.seed", f"must be a whole number >= 0, got {_kind(value)}")
            return None
        return int(value)

    def whole(self, path: str, value: Any, least: int, most: int, what: str) -> int | None:
        if value is None:
            self.problem(path, f"required: {what}, a whole number {least}..{most}")
            return None
        if not is_int(value) or not least <= value <= most:
            self.problem(path, f"must be a whole number {least}..{most}, got {_kind(value)}")
            return None
        return int(value)

    def number(self, path: str, value: Any, low: float, high: float, rule: str) -> float | None:
        """``value`` as a float when it is a number (not a boolean) within ``low..high`` (both included)."""
        if value is None:
            self.problem(path, f"required: a number {rule}")
            return None
        if not _is_number(value) or not low <= value <= high:
            self.problem(path, f"must be a number {rule}, got {_kind(value)}")
            return None
        return float(value)

    def pair(self, path: str, value: Any, rule: str) -> list[Any] | None:
        if value is None:
            self.problem(path, f"required: [low, high], {rule}")
            return None
        if not isinstance(value, list) or len(value) != 2:
            self.problem(path, f"must be [low, high], {rule}; got {_kind(value)}")
            return None
        return value

    def bounds(self, path: str, value: Any, limit: float) -> tuple[float, float] | None:
        """A pair of numbers in ``-limit..limit``, each problem at ``path[i]``."""
        pair = self.pair(path, value, f"degrees -{limit:g}..{limit:g}")
        if pair is None:
            return None
        numbers = [
            self.number(f"{path}[{i}]", v, -limit, limit, f"of degrees -{limit:g}..{limit:g}")
            for i, v in enumerate(pair)
        ]
        low, high = numbers
        return None if low is None or high is None else (low, high)

    def latitude(self, value: Any) -> tuple[float, float] | None:
        bounds = self.bounds("$.latitude", value, 90.0)
        if bounds is not None and not bounds[0] < bounds[1]:
            self.problem(
                "$.latitude", f"the low bound must be below the high one, got [{bounds[0]:g}, {bounds[1]:g}]"
            )
            return None
        return bounds

    def longitude(self, value: Any) -> tuple[float, float] | None:
        bounds = self.bounds("$.longitude", value, 180.0)
        if bounds is not None and _lon_width(*bounds) <= 0.0:
            self.problem(
                "$.longitude",
                f"must be a band of some width (low < high, or low > high across the antimeridian), "
                f"got [{bounds[0]:g}, {bounds[1]:g}]",
            )
            return None
        return bounds

    def times(self, value: Any) -> tuple[datetime, datetime] | None:
        pair = self.pair("$.time", value, 'UTC ISO-8601 instants such as "2024-01-15T01:00:00Z"')
        if pair is None:
            return None
        instants = [self.instant(f"$.time[{i}]", v) for i, v in enumerate(pair)]
        start, end = instants
        if start is None or end is None:
            return None
        if not start < end:
            self.problem("$.time", f"the start must be before the end, got [{_iso(start)}, {_iso(end)}]")
            return None
        if _whole_seconds(start, end)[1] == 0:
            self.problem("$.time", f"must hold a whole second, got [{_iso(start)}, {_iso(end)}]")
            return None
        return start, end

    def instant(self, path: str, value: Any) -> datetime | None:
        """A UTC datetime from ISO-8601 text, or from the datetime or date YAML reads unquoted."""
        when: datetime | None = None
        if isinstance(value, datetime):
            when = value
        elif isinstance(value, date):
            when = datetime.combine(value, time())
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(value.strip())
        if when is None:
            self.problem(
                path, f'must be an ISO-8601 instant such as "2024-01-15T01:00:00Z", got {_kind(value)}'
            )
            return None
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)

    def camera(self, camera: Any) -> Camera | None:
        if camera is None:
            self.problem("$.camera", f"required: {{{', '.join(_CAMERA)}}}")
            return None
        if not isinstance(camera, Mapping):
            self.problem("$.camera", f"must be a mapping {{{', '.join(_CAMERA)}}}, got {_kind(camera)}")
            return None
        self.unknown_fields("$.camera", camera, _CAMERA)
        altitude = self.number("$.camera.altitude", camera.get("altitude"), 0.0, 90.0, "of degrees 0..90")
        azimuth = camera.get("azimuth")
        if azimuth is None:
            self.problem("$.camera.azimuth", "required: degrees 0 <= azimuth < 360, 0 = north, 90 = east")
        elif not _is_number(azimuth) or not 0.0 <= azimuth < 360.0:
            self.problem("$.camera.azimuth", f"must be a number 0 <= azimuth < 360, got {_kind(azimuth)}")
            azimuth = None
        fov = camera.get("fov")
        if fov is None:
            self.problem("$.camera.fov", "required: the field of view, degrees 0 < fov < 180")
        elif not _is_number(fov) or not 0.0 < fov < 180.0:
            self.problem("$.camera.fov", f"must be a number 0 < fov < 180, got {_kind(fov)}")
            fov = None
        projection = camera.get("projection")
        if projection is None:
            self.problem("$.camera.projection", f"required: one of {', '.join(PROJECTIONS)}")
        elif projection not in PROJECTIONS:
            self.problem(
                "$.camera.projection", f"must be one of {', '.join(PROJECTIONS)}, got {_kind(projection)}"
            )
        size = self.size(camera.get("size"))
        if altitude is None or azimuth is None or fov is None or projection not in PROJECTIONS or not size:
            return None
        return Camera(
            altitude=altitude,
            azimuth=float(azimuth),
            fov=float(fov),
            projection=str(projection),
            width=size[0],
            height=size[1],
        )

    def size(self, value: Any) -> tuple[int, int] | None:
        rule = f"[width, height], whole numbers of pixels {MIN_SIDE}..{MAX_SIDE}"
        if value is None:
            self.problem("$.camera.size", f"required: {rule}")
            return None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(is_int(v) and MIN_SIDE <= v <= MAX_SIDE for v in value)
        ):
            shown = f"[{', '.join(_kind(v) for v in value)}]" if isinstance(value, list) else _kind(value)
            self.problem("$.camera.size", f"must be {rule}; got {shown}")
            return None
        return int(value[0]), int(value[1])

    def output(self, value: Any) -> str | None:
        rule = "an s3://bucket/prefix URL or a local directory"
        if value is None:
            self.problem("$.output", f"required: {rule}")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem("$.output", f"must be {rule}, got {_kind(value)}")
            return None
        if value[:5].lower() == "s3://":
            if (problem := s3_url_problem(value)) is not None:
                self.problem("$.output", problem)
                return None
            return self.trusted("$.output", trust.output_s3, value, self.policy)
        # A queued job writes only under the worker's output root (services/jobs/trust.py).
        return self.trusted("$.output", trust.output_directory, value, self.policy)
