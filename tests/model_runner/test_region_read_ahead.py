"""The regions of ``tessera run`` read ahead: the next region's strips start while the current one drains,
the detections are those of regions run one by one, and an error leaves no reader running."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from square_world import feature_boxes, place_squares, square_boxes, write_raster

from services.model_runner import pipeline
from services.model_runner.request import parse_request
from services.tiling.windows import Window

WIDTH, HEIGHT = 403, 297
#: Squares no larger than the overlap less the edge margin: each is whole, away from the sides, in a tile.
SIDES = (8, 14)


class FakeStream:
    """Stands in for a TileBatchStream: remembers its tiles, whether it started and was closed."""

    def __init__(self, tiles: list[Window], on_reads_done: Callable[[], None]) -> None:
        self.tiles = tiles
        self.on_reads_done = on_reads_done
        self.started = False
        self.closed = False

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True


def test_the_next_region_is_opened_and_started_when_the_current_reads_are_done() -> None:
    opened: list[FakeStream] = []

    def open_stream(tiles: list[Window], on_reads_done: Callable[[], None]) -> Any:
        opened.append(FakeStream(tiles, on_reads_done))
        return opened[-1]

    tiles = [[Window(i, 0, 1, 1)] for i in range(3)]
    with pipeline.RegionReadAhead(open_stream, [lambda t=t: t for t in tiles]) as ahead:
        first_tiles, first = ahead.take(0)
        assert first_tiles == tiles[0] and len(opened) == 1 and not first.started
        first.on_reads_done()  # region 0's reads are all handed out: region 1 opens and starts
        assert len(opened) == 2 and opened[1].started and opened[1].tiles == tiles[1]
        assert ahead.take(1) == (tiles[1], opened[1])
        opened[1].on_reads_done()
        assert len(opened) == 3 and opened[2].started
        opened[2].on_reads_done()  # the last region: nothing after it
        assert len(opened) == 3
    # Taken streams belong to their taker; region 2's, opened and never taken, is closed on the way out.
    assert [s.closed for s in opened] == [False, False, True]


def test_streams_opened_ahead_and_not_taken_are_closed() -> None:
    opened: list[FakeStream] = []

    def open_stream(tiles: list[Window], on_reads_done: Callable[[], None]) -> Any:
        opened.append(FakeStream(tiles, on_reads_done))
        return opened[-1]

    with pipeline.RegionReadAhead(open_stream, [lambda: [Window(0, 0, 1, 1)]] * 2) as ahead:
        _, first = ahead.take(0)
        first.on_reads_done()
    assert opened[1].started and opened[1].closed
    first.on_reads_done()  # after the block: nothing opens, nothing raises
    assert len(opened) == 2


def test_a_region_that_cannot_open_ahead_raises_when_its_turn_comes() -> None:
    calls = {"n": 0}

    def open_stream(tiles: list[Window], on_reads_done: Callable[[], None]) -> Any:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise ValueError("region 1 cannot be read")
        return FakeStream(tiles, on_reads_done)

    with pipeline.RegionReadAhead(open_stream, [lambda: [Window(0, 0, 1, 1)]] * 2) as ahead:
        _, first = ahead.take(0)
        first.on_reads_done()  # the error stays with region 1, not with region 0's reader
        with pytest.raises(ValueError, match="region 1 cannot be read"):
            ahead.take(1)


def _request(image: Path, model: Path, out: Path, region: int = 96) -> dict:
    return {
        "image": str(image),
        "model": str(model),
        "overlap": [16, 16],
        "region_size": [region, region],
        "outputs": {"path": str(out)},
    }


def test_run_image_starts_each_next_region_before_its_turn(
    square_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squares = place_squares(WIDTH, HEIGHT, seed=4, count=40, sides=SIDES)
    image = write_raster(tmp_path / "scene.tif", squares, WIDTH, HEIGHT)
    started_at_turn: list[bool] = []
    real = pipeline.detect_region

    def detect_region(*args: Any, **kwargs: Any) -> pipeline.RegionOutcome:
        started_at_turn.append(kwargs["batches"].started)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "detect_region", detect_region)
    out = tmp_path / "out.geojson"
    summary = pipeline.run_image(parse_request(_request(image, square_model, out)))
    assert summary.regions == len(started_at_turn) > 4
    assert started_at_turn[0] is False and all(started_at_turn[1:])
    found = sorted(feature_boxes(json.loads(out.read_text())))
    monkeypatch.undo()
    whole = tmp_path / "whole.geojson"
    assert pipeline.run_image(parse_request(_request(image, square_model, whole, region=4096))).regions == 1
    # Every square once, as one region holding the whole image finds them.
    assert found == sorted(feature_boxes(json.loads(whole.read_text()))) == sorted(square_boxes(squares))


def test_a_failing_region_leaves_no_reader_running(
    square_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squares = place_squares(WIDTH, HEIGHT, seed=4, count=40)
    image = write_raster(tmp_path / "scene.tif", squares, WIDTH, HEIGHT)
    real = pipeline.detect_region
    calls = {"n": 0}

    def detect_region(*args: Any, **kwargs: Any) -> pipeline.RegionOutcome:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the model broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "detect_region", detect_region)
    with pytest.raises(RuntimeError, match="the model broke"):
        pipeline.run_image(parse_request(_request(image, square_model, tmp_path / "out.geojson")))
    left = [t.name for t in threading.enumerate() if t.name.startswith(("tile-read", "tile-assembler"))]
    assert left == []
