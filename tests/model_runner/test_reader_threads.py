"""How many threads decode strips: two beside a model on this CPU, more when the model runs elsewhere; the
detections never depend on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from square_world import place_squares, write_raster

from services.inference.detector import OnnxDetector
from services.inference.endpoint import EndpointDetector
from services.model_runner import model_setup, pipeline
from services.model_runner.request import MergeSettings
from services.tiling.windows import Window


def test_two_threads_beside_a_model_on_this_cpu(square_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_setup, "usable_cores", lambda: 16)
    detector = OnnxDetector(str(square_model), providers="cpu", batch_size=4)
    assert model_setup.reader_threads(detector) == model_setup.READER_THREADS_BESIDE_CPU_MODEL == 2


@pytest.mark.parametrize(("cores", "threads"), [(1, 2), (2, 2), (4, 3), (8, 7), (16, 8), (64, 8)])
def test_every_core_but_one_when_the_model_runs_elsewhere(
    cores: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_setup, "usable_cores", lambda: cores)
    endpoint = EndpointDetector("http://127.0.0.1:9", tile_width=64, tile_height=64, class_names=["square"])
    assert model_setup.reader_threads(endpoint) == threads


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_detections_do_not_depend_on_the_reader_threads(
    threads: int, square_model: Path, tmp_path: Path
) -> None:
    width, height = 600, 440
    squares = place_squares(width, height, seed=5, count=30)
    image = write_raster(tmp_path / "scene.tif", squares, width, height)
    detector = OnnxDetector(str(square_model), providers="cpu", batch_size=4)
    grid = pipeline.Grid(64, 64, 24, 24, 4096, 4096)
    region = Window(0, 0, width, height)
    with pipeline.RasterSource.open(str(image)) as source:
        tiles = pipeline.region_tiles(grid, region, width, height, None)
        runs = [
            pipeline.detect_region(
                source, detector, tiles, batch_size=4, merge=MergeSettings(), threads=count, prefetch=1
            )
            for count in (None, threads)
        ]
    default, chosen = (run.detections for run in runs)
    assert len(default) == len(squares) and runs[0].tiles == runs[1].tiles == len(tiles)
    order = [np.lexsort(d.boxes.T[::-1]) for d in (default, chosen)]
    np.testing.assert_array_equal(default.boxes[order[0]], chosen.boxes[order[1]])
    np.testing.assert_array_equal(default.labels[order[0]], chosen.labels[order[1]])
