"""A world of bright squares on a dark textured ground, and a real ONNX detector that finds them exactly.

The detector (built with ``onnx.helper``) thresholds the first channel at 0.5 and reports every bright
rectangle it sees in a tile: a box starts where a bright pixel has no bright pixel left of it and none
above it, and its width and height are the bright run lengths from there (a convolution with a row or a
column of ones, ``reach`` long). So a square wholly inside a tile comes out exactly, and a square cut by the
tile's edge comes out as the visible part — the partial boxes a real detector makes at tile seams. Squares
must be at least ``reach`` apart, so a run never reaches the next one.

``slow`` adds that many 512 x 512 matrix products per tile whose result is multiplied by 0 and added to the
scores: the same detections, but a tile takes measurable time (for tests that must catch a worker mid-region).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import rasterio
from onnx import TensorProto, helper, numpy_helper
from rasterio.transform import Affine

CLASS_NAMES = ["square"]
#: The detector's tile; tests use an overlap of at least the largest square.
TILE = 64
REACH = 24
BACKGROUND = (20, 90)  # texture range: always below the 0.5 threshold
BRIGHT = 235


def build_square_detector(
    path: Path, *, tile: int = TILE, reach: int = REACH, k: int = 16, slow: int = 0
) -> Path:
    """Write the square detector (input ``images [N, 3, tile, tile]``, ``x/255``) to ``path``."""
    t = tile
    c = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    ys, xs = np.mgrid[0:t, 0:t].astype(np.float32)
    inits = [
        c("xs", xs.reshape(1, 1, t, t)),
        c("ys", ys.reshape(1, 1, t, t)),
        c("half", np.array(0.5, np.float32)),
        c("one", np.array(1.0, np.float32)),
        c("zero", np.array(0.0, np.float32)),
        c("c0", np.array([0], np.int64)),
        c("c1", np.array([1], np.int64)),
        c("ax1", np.array([1], np.int64)),
        c("ax2", np.array([2], np.int64)),
        c("ax3", np.array([3], np.int64)),
        c("end_t", np.array([t], np.int64)),
        c("pad_left", np.array([0, 0, 0, 1, 0, 0, 0, 0], np.int64)),
        c("pad_top", np.array([0, 0, 1, 0, 0, 0, 0, 0], np.int64)),
        c("row_ones", np.ones((1, 1, 1, reach), np.float32)),
        c("col_ones", np.ones((1, 1, reach, 1), np.float32)),
        c("flat4", np.array([0, 4, -1], np.int64)),
        c("flat", np.array([0, -1], np.int64)),
        c("k", np.array([k], np.int64)),
        c("four", np.array([4], np.int64)),
        c("last", np.array([-1], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("Slice", ["images", "c0", "c1", "ax1"], ["grey"]),
        n("Greater", ["grey", "half"], ["bright_bool"]),
        n("Cast", ["bright_bool"], ["bright"], to=TensorProto.FLOAT),
        n("Pad", ["bright", "pad_left"], ["bright_padded_left"]),
        n("Slice", ["bright_padded_left", "c0", "end_t", "ax3"], ["left"]),
        n("Pad", ["bright", "pad_top"], ["bright_padded_top"]),
        n("Slice", ["bright_padded_top", "c0", "end_t", "ax2"], ["above"]),
        n("Sub", ["one", "left"], ["no_left"]),
        n("Sub", ["one", "above"], ["no_above"]),
        n("Mul", ["bright", "no_left"], ["corner_a"]),
        n("Mul", ["corner_a", "no_above"], ["corner"]),
        n("Conv", ["bright", "row_ones"], ["run_w"], pads=[0, 0, 0, reach - 1]),
        n("Conv", ["bright", "col_ones"], ["run_h"], pads=[0, 0, reach - 1, 0]),
        n("Mul", ["corner", "zero"], ["zeros"]),
        n("Add", ["xs", "zeros"], ["x1"]),
        n("Add", ["ys", "zeros"], ["y1"]),
        n("Add", ["x1", "run_w"], ["x2"]),
        n("Add", ["y1", "run_h"], ["y2"]),
        n("Concat", ["x1", "y1", "x2", "y2"], ["box_planes"], axis=1),
        n("Reshape", ["box_planes", "flat4"], ["box_rows"]),
        n("Transpose", ["box_rows"], ["all_boxes"], perm=[0, 2, 1]),
        n("Reshape", ["corner", "flat"], ["corner_scores"]),
    ]
    score_input = "corner_scores"
    if slow:
        repeats = -(-512 // t)
        inits += [
            c("square_shape", np.array([0, t, t], np.int64)),
            c("repeats", np.array([1, repeats, repeats], np.int64)),
            c("weights", np.full((repeats * t, repeats * t), 1.0 / (repeats * t), np.float32)),
            c("ax_matrix", np.array([1, 2], np.int64)),
        ]
        nodes += [
            n("Reshape", ["grey", "square_shape"], ["grey_square"]),
            n("Tile", ["grey_square", "repeats"], ["work_0"]),
        ]
        nodes += [n("MatMul", [f"work_{i}", "weights"], [f"work_{i + 1}"]) for i in range(slow)]
        nodes += [
            n("ReduceSum", [f"work_{slow}", "ax_matrix"], ["work_sum"], keepdims=0),
            n("Mul", ["work_sum", "zero"], ["work_zero_n"]),
            n("Unsqueeze", ["work_zero_n", "last"], ["work_zero"]),
            n("Add", ["corner_scores", "work_zero"], ["slow_scores"]),
        ]
        score_input = "slow_scores"
    nodes += [
        n("TopK", [score_input, "k"], ["scores", "index"], axis=1),
        n("Unsqueeze", ["index", "last"], ["index_3d"]),
        n("Shape", ["index"], ["index_shape"]),
        n("Concat", ["index_shape", "four"], ["gather_shape"], axis=0),
        n("Expand", ["index_3d", "gather_shape"], ["index_boxes"]),
        n("GatherElements", ["all_boxes", "index_boxes"], ["boxes"], axis=1),
        n("Mul", ["index", "c0"], ["labels"]),
    ]
    graph = helper.make_graph(
        nodes,
        "square_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, t, t])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", k]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {
        "tessera.class_names": json.dumps(CLASS_NAMES),
        "tessera.input_scale": "1/255",
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def build_wrong_shape_model(path: Path) -> Path:
    """A model whose output is one [N, 7] tensor: no boxes, scores and labels, not a YOLO head either."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("Tile", ["pooled", "reps"], ["wide"]),
            helper.make_node("Slice", ["wide", "s0", "s7", "s1"], ["out"]),
        ],
        "wrong",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, TILE, TILE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 7])],
        initializer=[
            numpy_helper.from_array(np.array([1, 3], np.int64), "reps"),
            numpy_helper.from_array(np.array([0], np.int64), "s0"),
            numpy_helper.from_array(np.array([7], np.int64), "s7"),
            numpy_helper.from_array(np.array([1], np.int64), "s1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def place_squares(
    width: int,
    height: int,
    *,
    seed: int,
    count: int,
    sides: tuple[int, int] = (8, 16),
    must: Sequence[tuple[int, int, int]] = (),
    reach: int = REACH,
) -> np.ndarray:
    """Squares ``[M, 4]`` (x1, y1, x2, y2; x2/y2 exclusive) inside the image, ``reach`` apart.

    ``must`` squares ``(x, y, side)`` come first (e.g. across seams); random ones fill up to ``count``.
    """
    rng = np.random.default_rng(seed)
    placed: list[tuple[int, int, int, int]] = []

    def free(x: int, y: int, s: int) -> bool:
        return all(
            x + s + reach <= a or c + reach <= x or y + s + reach <= b or d + reach <= y
            for a, b, c, d in placed
        )

    for x, y, s in must:
        assert free(x, y, s), f"forced square {(x, y, s)} is too close to another"
        placed.append((x, y, x + s, y + s))
    tries = 0
    while len(placed) < count and tries < 20_000:
        tries += 1
        s = int(rng.integers(sides[0], sides[1] + 1))
        x = int(rng.integers(1, width - s - 1))
        y = int(rng.integers(1, height - s - 1))
        if free(x, y, s):
            placed.append((x, y, x + s, y + s))
    return np.array(placed, np.float32).reshape(-1, 4)


def paint(width: int, height: int, squares: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """uint8 [H, W]: a dark textured ground with the squares bright."""
    rng = np.random.default_rng(seed)
    ground = rng.integers(BACKGROUND[0], BACKGROUND[1], size=(height, width), dtype=np.uint8)
    for x1, y1, x2, y2 in squares.astype(int).tolist():
        ground[y1:y2, x1:x2] = BRIGHT
    return ground


def write_raster(
    path: Path,
    squares: np.ndarray,
    width: int,
    height: int,
    *,
    crs: str = "EPSG:32633",
    transform: Affine | None = None,
    bands: int = 3,
    dtype: str = "uint8",
    tiled: bool = True,
    seed: int = 0,
) -> Path:
    """A GeoTIFF of the squares: ``bands`` copies of the painted plane (uint16 scaled by 257)."""
    plane = paint(width, height, squares, seed=seed)
    data = plane.astype(np.uint16) * 257 if dtype == "uint16" else plane
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": bands,
        "dtype": dtype,
        "crs": crs,
        "transform": transform or Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0),
        "compress": "deflate",
    }
    if tiled:
        profile.update(tiled=True, blockxsize=64, blockysize=64)
    with rasterio.open(path, "w", **profile) as out:
        out.write(np.repeat(data[None], bands, axis=0))
    return path


def feature_boxes(collection: dict) -> list[tuple[float, float, float, float]]:
    """The ``pixel_bbox`` of every feature of a FeatureCollection, sorted."""
    return sorted(tuple(f["properties"]["pixel_bbox"]) for f in collection["features"])


def square_boxes(squares: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Known squares as sorted tuples, comparable with :func:`feature_boxes`."""
    return sorted(tuple(float(v) for v in row) for row in squares.tolist())
