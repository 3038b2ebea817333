"""The model runner: image requests in, tiled detection on huge rasters, GeoJSON out.

Reads top-down: ``commands`` (the CLI) and ``worker`` (the queue loop) -> ``handler`` (one message) ->
``pipeline`` (the in-process detection pipeline over the shared tiling, inference and geo libraries);
``jobs`` keeps job and region records in PostgreSQL; ``request`` is the request schema.
"""
