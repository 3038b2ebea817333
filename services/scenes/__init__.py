"""Synthetic scenes with known objects: in memory for training, or as big tiled GeoTIFFs for the pipeline.

- :mod:`services.scenes.synthetic`: layouts (where the objects are) and the window renderer;
- :mod:`services.scenes.geotiff`: a scene written block by block as a georeferenced tiled GeoTIFF;
- :mod:`services.scenes.scoring`: precision and recall of detections against the known objects.
"""

from services.scenes.geotiff import write_scene_geotiff
from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import (
    DEFAULT_CLASSES,
    SceneLayout,
    content_areas,
    generate_scene,
    layout_scene,
    render_window,
)

__all__ = [
    "DEFAULT_CLASSES",
    "SceneLayout",
    "Score",
    "content_areas",
    "generate_scene",
    "layout_scene",
    "render_window",
    "score_detections",
    "write_scene_geotiff",
]
