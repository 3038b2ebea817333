"""Where the Sun is, fast enough to test every candidate instant of every frame: its altitude from the
low-precision formulas of the Astronomical Almanac (about 0.01 degrees from 1950 to 2050; astropy agrees to
within 0.05 degrees, tests/sky_generator/test_sun.py), vectorised over NumPy arrays."""

from __future__ import annotations

import numpy as np

#: The Sun this far below the horizon or more: nautical twilight has ended, the bright stars are out.
NIGHT_SUN_ALTITUDE = -12.0
_UNIX_EPOCH_JD = 2440587.5
_J2000_JD = 2451545.0


def sun_altitude(lat: np.ndarray | float, lon: np.ndarray | float, unix_s: np.ndarray | float) -> np.ndarray:
    """The Sun's geometric altitude in degrees seen from ``lat``, ``lon`` (degrees, east positive) at
    ``unix_s`` (seconds since 1970-01-01 UTC); arrays broadcast."""
    n = np.asarray(unix_s, dtype=np.float64) / 86400.0 + _UNIX_EPOCH_JD - _J2000_JD  # days from J2000.0
    mean_longitude = np.radians((280.460 + 0.9856474 * n) % 360.0)
    anomaly = np.radians((357.528 + 0.9856003 * n) % 360.0)
    ecliptic = mean_longitude + np.radians(1.915) * np.sin(anomaly) + np.radians(0.020) * np.sin(2 * anomaly)
    obliquity = np.radians(23.439 - 0.0000004 * n)
    ra = np.arctan2(np.cos(obliquity) * np.sin(ecliptic), np.cos(ecliptic))
    dec = np.arcsin(np.sin(obliquity) * np.sin(ecliptic))
    sidereal = np.radians((280.46061837 + 360.98564736629 * n) % 360.0)
    hour_angle = sidereal + np.radians(np.asarray(lon, dtype=np.float64)) - ra
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    return np.degrees(np.arcsin(np.sin(phi) * np.sin(dec) + np.cos(phi) * np.cos(dec) * np.cos(hour_angle)))
