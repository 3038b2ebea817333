"""The sky-position model's ``time`` input: six float32 features of the UTC instant of the exposure.

``sin, cos`` of 2 pi * (day of year - 1 + fraction of day) / 365.2422 (the season: which stars are up at
night), ``sin, cos`` of 2 pi * UTC hour / 24, and ``sin, cos`` of Greenwich mean sidereal time (IAU 1982,
linear term: 280.46061837 deg + 360.98564736629 deg * (JD - 2451545.0)). Sidereal time is what fixes the
stars' hour angles, so with it the network only has to learn longitude as an offset.

The trainer makes these when it trains and exports; whoever feeds the exported model makes them with the
same function, so the two cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

TIME_FEATURES = 6
#: The features' names, in order (the exported model's ``tessera.time_features`` metadata).
TIME_FEATURE_NAMES = (
    "sin_day_of_year",
    "cos_day_of_year",
    "sin_utc_hour",
    "cos_utc_hour",
    "sin_gmst",
    "cos_gmst",
)
#: The definition in words (the exported model's ``tessera.time_feature_definition`` metadata).
TIME_FEATURE_DEFINITION = (
    "UTC instant t: angles 2pi*(day of year - 1 + day fraction)/365.2422, 2pi*UTC hour/24, "
    "GMST = 280.46061837 deg + 360.98564736629 deg * (JD - 2451545.0); sin and cos of each"
)
_TROPICAL_YEAR_DAYS = 365.2422
_UNIX_EPOCH_JD = 2440587.5
_J2000_JD = 2451545.0


def time_features(times: Sequence[datetime]) -> np.ndarray:
    """float32 ``[len(times), 6]``: the model's time input (see the module docstring); a naive datetime is
    taken as UTC."""
    out = np.zeros((len(times), TIME_FEATURES), np.float64)
    for i, given in enumerate(times):
        when = given.replace(tzinfo=UTC) if given.tzinfo is None else given.astimezone(UTC)
        start = datetime(when.year, 1, 1, tzinfo=UTC)
        day = (when - start).total_seconds() / 86400.0
        hour = (when - when.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds() / 3600.0
        julian = when.timestamp() / 86400.0 + _UNIX_EPOCH_JD
        gmst = math.radians((280.46061837 + 360.98564736629 * (julian - _J2000_JD)) % 360.0)
        angles = (2 * math.pi * day / _TROPICAL_YEAR_DAYS, 2 * math.pi * hour / 24.0, gmst)
        out[i] = [f(a) for a in angles for f in (math.sin, math.cos)]
    return out.astype(np.float32)
