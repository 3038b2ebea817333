"""Celestial navigation, shared by the sky generator and the trainer: the sky-position model's time input
(:mod:`services.celnav.time_input`) and distances on the Earth (:mod:`services.celnav.distance`)."""

from services.celnav.distance import EARTH_RADIUS_KM, KM_PER_NM, haversine_km
from services.celnav.time_input import (
    TIME_FEATURE_DEFINITION,
    TIME_FEATURE_NAMES,
    TIME_FEATURES,
    time_features,
)

__all__ = [
    "EARTH_RADIUS_KM",
    "KM_PER_NM",
    "TIME_FEATURES",
    "TIME_FEATURE_DEFINITION",
    "TIME_FEATURE_NAMES",
    "haversine_km",
    "time_features",
]
