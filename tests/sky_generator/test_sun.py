"""The fast Sun altitude agrees with astropy's over places and instants spread across the century."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from services.sky_generator.geometry import use_bundled_iers
from services.sky_generator.sun import sun_altitude


@pytest.mark.filterwarnings("ignore::erfa.ErfaWarning")  # UTC after the leap-second table: "dubious year"
def test_the_fast_sun_agrees_with_astropy() -> None:
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, get_sun
    from astropy.time import Time

    use_bundled_iers()  # offline, and valid whatever today's date is against the bundled tables
    rng = np.random.default_rng(3)
    n = 200
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    start = datetime(1990, 1, 1, tzinfo=UTC).timestamp()
    unix = rng.uniform(start, datetime(2040, 1, 1, tzinfo=UTC).timestamp(), n)
    when = Time(unix, format="unix")
    frame = AltAz(obstime=when, location=EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, 0 * u.m))
    expected = get_sun(when).transform_to(frame).alt.deg
    error = np.abs(sun_altitude(lat, lon, unix) - expected)
    assert error.max() < 0.05, error.max()  # measured: 0.012 degrees at most
