"""A tile size x batch that would not fit in memory is refused before anything is read, with the fix."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from square_world import place_squares, write_raster

from services.cli import main
from services.errors import UserError
from services.model_runner.model_setup import MAX_BATCH_ENV, batch_limit_bytes, check_batch_size


class _Detector:
    name, provider, class_names = "big", "CPUExecutionProvider", []

    def __init__(self, side: int, batch: int, channels: int = 3) -> None:
        self.tile_width = self.tile_height = side
        self.batch_size, self.channels = batch, channels


def test_the_limit_and_its_setting() -> None:
    assert batch_limit_bytes({}) == 512 * 2**20
    assert batch_limit_bytes({MAX_BATCH_ENV: "64"}) == 64 * 2**20
    for bad in ("lots", "0", "-5"):
        with pytest.raises(UserError, match=MAX_BATCH_ENV):
            batch_limit_bytes({MAX_BATCH_ENV: bad})
    check_batch_size(_Detector(512, 8))  # 24 MiB
    check_batch_size(_Detector(4096, 2))  # 384 MiB
    with pytest.raises(UserError, match=r"1,536 MiB.*use batch_size \(tessera run --batch\) 2 or less"):
        check_batch_size(_Detector(4096, 8))
    with pytest.raises(UserError, match="use smaller tiles"):
        check_batch_size(_Detector(16384, 1))


def test_tessera_run_refuses_a_16384_px_tile_with_one_line(
    square_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dynamic = onnx.load(square_model)  # the square detector, told its tile size is dynamic
    for dim in dynamic.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"
    model = tmp_path / "dynamic.onnx"
    onnx.save(dynamic, model)
    image = write_raster(tmp_path / "scene.tif", place_squares(200, 200, seed=2, count=3), 200, 200)
    out = tmp_path / "found.geojson"
    argv = ["run", str(image), "--model", str(model), "--out", str(out), "--tile", "16384", "16384"]
    assert main([*argv, "--overlap", "8"]) == 2
    err = capsys.readouterr().err
    # No --batch: on the CPU one tile this large per call, and even one is over the limit.
    assert "tessera run: a batch of 1 tile of 16384x16384x3 float32 is 3,072 MiB" in err
    assert "use smaller tiles" in err
    assert "Traceback" not in err and not out.exists()
    assert main([*argv, "--overlap", "8", "--batch", "8"]) == 2
    assert "a batch of 8 tiles of 16384x16384x3 float32 is 24,576 MiB" in capsys.readouterr().err
