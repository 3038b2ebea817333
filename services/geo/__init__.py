"""Geo output: detections in image pixels as RFC 7946 GeoJSON in longitude/latitude."""

from services.geo.features import FeatureWriter, NonFiniteError, box_rings, pixel_to_map

__all__ = ["FeatureWriter", "NonFiniteError", "box_rings", "pixel_to_map"]
