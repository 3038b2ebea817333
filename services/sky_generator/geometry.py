"""Geometry proven, not assumed: do a frame's bright stars sit where its label says they must?

For a frame's observer (latitude, longitude), UTC instant and camera (altitude, azimuth, field of view,
projection, image size), astropy computes each bright catalogue star's apparent altitude and azimuth
(precession, nutation, aberration; refraction only when the frame has an atmosphere) and the camera model
projects it to pixels: a star at angle ``theta`` from the view centre lands ``k * g(theta)`` pixels from the
image centre, ``g = tan`` (perspective) or ``2 tan(theta / 2)`` (stereographic), with ``k`` set so that half
the field of view spans half the image height (Stellarium's field of view is vertical), no roll, zenith up.

The frame's bright blobs (local maxima of luminance, centroided) are matched to the predictions; the frame
passes when enough predicted stars have a blob within :data:`MATCH_RADIUS_PX` and the median error is
within ``max_median_px``. The same frame checked against a label with latitude and longitude swapped fails:
the check can tell.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.sky_generator.job import Camera, Sample

STARS_FILE = Path(__file__).with_name("bright_stars.csv")
#: Stars at least this bright are predicted and must be found.
MAX_MAGNITUDE = 2.5
#: A predicted star matches the nearest bright blob within this distance.
MATCH_RADIUS_PX = 12.0
#: A frame passes with a median error within this many pixels ...
MAX_MEDIAN_PX = 3.0
#: ... and this share of its predicted stars matched, and at least this many.
MIN_MATCHED_SHARE = 0.7
MIN_PREDICTED = 3
#: Stars this close to the image border are not predicted (a disc cut by the border centroids off).
BORDER_PX = 6


@dataclass(frozen=True)
class StarPixel:
    """Where a catalogue star must fall in a frame."""

    name: str
    vmag: float
    x: float
    y: float


@dataclass(frozen=True)
class FrameGeometry:
    """A frame's check: which stars were predicted, where they were found, and the verdict."""

    predicted: list[StarPixel]
    errors_px: list[float | None]  # per predicted star: distance to its blob, None when unmatched

    @property
    def matched(self) -> int:
        """Predicted stars with a blob near them."""
        return sum(e is not None for e in self.errors_px)

    @property
    def median_px(self) -> float:
        """Median error of the matched stars (inf when none matched)."""
        found = [e for e in self.errors_px if e is not None]
        return float(np.median(found)) if found else float("inf")

    @property
    def worst_px(self) -> float:
        """Largest error of the matched stars (inf when none matched)."""
        found = [e for e in self.errors_px if e is not None]
        return float(max(found)) if found else float("inf")

    def passed(self, max_median_px: float = MAX_MEDIAN_PX) -> bool:
        """Enough stars predicted and matched, with a small median error."""
        n = len(self.predicted)
        return (
            n >= MIN_PREDICTED and self.matched >= MIN_MATCHED_SHARE * n and self.median_px <= max_median_px
        )

    def summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"{self.matched}/{len(self.predicted)} bright stars matched, median {self.median_px:.2f} px, "
            f"worst {self.worst_px:.2f} px"
        )


@cache
def bright_stars(max_magnitude: float = MAX_MAGNITUDE) -> tuple[tuple[str, float, float, float], ...]:
    """``(name, ra_deg, dec_deg, vmag)`` of the shipped catalogue's stars of ``max_magnitude`` or brighter."""
    with STARS_FILE.open() as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        stars = [(r["name"], float(r["ra_deg"]), float(r["dec_deg"]), float(r["vmag"])) for r in rows]
    return tuple(s for s in stars if s[3] <= max_magnitude)


def use_bundled_iers() -> None:
    """Make astropy use the Earth-rotation (IERS) tables it ships, offline, for any date: nothing is
    fetched at run time, and instants past the tables' predictions are extrapolated (to well within a
    pixel of the cameras here) instead of refused once the tables are 30 days older than today."""
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    iers.conf.iers_degraded_accuracy = "ignore"


def predict(
    lat: float, lon: float, when: datetime, camera: Camera, *, atmosphere: bool = False
) -> list[StarPixel]:
    """The bright stars inside the frame of ``camera`` for an observer at ``lat``, ``lon`` at ``when``
    (refracted by a standard atmosphere when ``atmosphere``)."""
    if not -90 <= lat <= 90:
        raise ValueError(f"latitude {lat} is outside -90..90")
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time

    use_bundled_iers()
    stars = bright_stars()
    catalogue = SkyCoord(ra=[s[1] for s in stars] * u.deg, dec=[s[2] for s in stars] * u.deg, frame="icrs")
    frame = AltAz(
        obstime=Time(when),
        location=EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, 0 * u.m),
        pressure=(1013.25 if atmosphere else 0.0) * u.hPa,
        temperature=15 * u.deg_C,
        relative_humidity=0,
        obswl=0.55 * u.micron,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns about IERS accuracy far from the tables' dates
        seen = catalogue.transform_to(frame)
    alt = np.radians(np.asarray(seen.alt.deg))
    az = np.radians(np.asarray(seen.az.deg))
    x, y, inside = project(alt, az, camera)
    return [
        StarPixel(stars[i][0], stars[i][3], float(x[i]), float(y[i]))
        for i in np.flatnonzero(inside & (alt > 0))
    ]


def project(alt: np.ndarray, az: np.ndarray, camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel ``x, y`` (origin top left) of directions ``alt, az`` (radians) in ``camera``, and which fall
    inside the image (:data:`BORDER_PX` in from its edges)."""
    a0, z0 = np.radians(camera.altitude), np.radians(camera.azimuth)
    # East, north, up components of each direction and of the camera's axes.
    v = np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1)
    forward = np.array([np.cos(a0) * np.sin(z0), np.cos(a0) * np.cos(z0), np.sin(a0)])
    right = np.array([np.cos(z0), -np.sin(z0), 0.0])
    up = np.cross(right, forward)
    across, along, depth = v @ right, v @ up, v @ forward
    theta = np.arctan2(np.hypot(across, along), depth)
    phi = np.arctan2(along, across)
    g = _radial(camera.projection)
    scale = (camera.height / 2) / g(np.radians(camera.fov) / 2)
    with np.errstate(invalid="ignore", over="ignore"):
        r = scale * g(theta)
    x = camera.width / 2 + r * np.cos(phi)
    y = camera.height / 2 - r * np.sin(phi)
    limit = np.pi / 2 if camera.projection == "perspective" else np.pi * 0.95
    inside = (
        (theta < limit)
        & (x >= BORDER_PX)
        & (x <= camera.width - 1 - BORDER_PX)
        & (y >= BORDER_PX)
        & (y <= camera.height - 1 - BORDER_PX)
    )
    return x, y, inside


def _radial(projection: str) -> Callable[[Any], Any]:
    """The projection's distance from the image centre as a function of the angle from the view axis."""
    if projection == "perspective":
        return np.tan
    if projection == "stereographic":
        return lambda theta: 2 * np.tan(theta / 2)
    raise UserError(f"no camera model for projection {projection!r}; use perspective or stereographic")


def find_blobs(pixels: np.ndarray, *, count: int = 60, window: int = 9, reach: int = 8) -> np.ndarray:
    """The ``count`` brightest blobs of an image (``[H, W]`` luminance or ``[H, W, 3]`` RGB, 0..255):
    ``[N, 3]`` rows of centroid ``x, y`` and flux, brightest first.

    Stellarium draws a star as a disc whose core saturates whatever its magnitude, and brighter stars as
    wider discs, so blobs are ranked by flux (the sum over the ``2 * reach + 1`` square around a local
    maximum, less the background: the median of the square's border), not by their peak."""
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    half = window // 2
    padded = np.pad(image, half, mode="edge")
    local_max = np.lib.stride_tricks.sliding_window_view(padded, (window, window)).max(axis=(2, 3))
    floor = float(np.median(image)) + 20.0
    peaks = np.argwhere((image >= local_max) & (image >= floor))
    if len(peaks) == 0:
        return np.zeros((0, 3), np.float32)
    side = 2 * reach + 1
    squares = np.lib.stride_tricks.sliding_window_view(np.pad(image, reach, mode="edge"), (side, side))
    around = squares[peaks[:, 0], peaks[:, 1]]  # [N, side, side]
    border = np.concatenate(
        [around[:, 0, :], around[:, -1, :], around[:, 1:-1, 0], around[:, 1:-1, -1]], axis=1
    )
    above = np.clip(around - np.median(border, axis=1)[:, None, None], 0, None)
    flux = above.sum(axis=(1, 2))
    offsets = np.arange(-reach, reach + 1, dtype=np.float32)
    total = np.where(flux > 0, flux, 1.0)
    dx = (above.sum(axis=1) * offsets).sum(axis=1) / total
    dy = (above.sum(axis=2) * offsets).sum(axis=1) / total
    kept: list[tuple[float, float, float]] = []
    for index in np.argsort(-flux, kind="stable"):
        x, y = float(peaks[index, 1] + dx[index]), float(peaks[index, 0] + dy[index])
        if any((x - kx) ** 2 + (y - ky) ** 2 < reach**2 for kx, ky, _ in kept):
            continue  # a plateau's other pixels, or the halo of a brighter star
        kept.append((x, y, float(flux[index])))
        if len(kept) >= count:
            break
    return np.array(kept, np.float32).reshape(-1, 3)


def check_frame(image: Path | np.ndarray, frame: Sample, *, swapped: bool = False) -> FrameGeometry:
    """Predict ``frame``'s bright stars from its label and match them to the image's blobs (see the module
    docstring). ``swapped`` checks the label with latitude and longitude exchanged (the counter-test)."""
    lat, lon = (frame.lon, frame.lat) if swapped else (frame.lat, frame.lon)
    if isinstance(image, Path):
        from PIL import Image

        with Image.open(image) as png:
            pixels = np.asarray(png.convert("RGB"))
    else:
        pixels = image
    predicted = predict(lat, lon, frame.time, frame.camera, atmosphere=frame.atmosphere)
    blobs = find_blobs(pixels, count=max(60, 4 * len(predicted)))
    errors: list[float | None] = []
    for star in predicted:
        if len(blobs) == 0:
            errors.append(None)
            continue
        distance = np.hypot(blobs[:, 0] - star.x, blobs[:, 1] - star.y)
        nearest = float(distance.min())
        errors.append(nearest if nearest <= MATCH_RADIUS_PX else None)
    return FrameGeometry(predicted=predicted, errors_px=errors)
