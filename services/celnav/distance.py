"""Great-circle distances on a spherical Earth (the IUGG mean radius), in km and nautical miles."""

from __future__ import annotations

from typing import Any

import numpy as np

#: The IUGG mean Earth radius, km (the trainer's sky-position loss uses it too).
EARTH_RADIUS_KM = 6371.0088
KM_PER_NM = 1.852


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray:
    """Great-circle distances (km, float64) between degree positions; arguments broadcast like NumPy's."""
    p1, l1, p2, l2 = (np.radians(np.asarray(v, np.float64)) for v in (lat1, lon1, lat2, lon2))
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))
