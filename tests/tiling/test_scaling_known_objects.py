"""Input scaling against known objects: a synthetic scene written as float64, signed, 12-bit and single-band
GeoTIFFs, run through the whole pipeline with the shipped demo detector.

Without a rule each image either runs as well as the uint8 original (the documented rule covers it) or is
refused with a UserError that names its dtype and bands and the rule to state; with the stated rule each
finds the known objects as the uint8 original does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from services.errors import UserError
from services.model_runner.demo import DEFAULT_MODEL
from services.model_runner.pipeline import run_image
from services.model_runner.request import parse_request
from services.scenes import Score, generate_scene, score_detections
from services.scenes.synthetic import DEFAULT_CLASSES
from services.tiling.scaling import ScalingRule

SIZE = 1024  # about 84 objects at the default density; 3 x 3 tiles of the detector's 512 px
SEED = 29
#: int16 pixels: 8 * value - OFFSET, so that the dark half of the scene is negative.
OFFSET = 1000


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    """The scene's folder, its uint8 pixels [3, H, W] and its known boxes and labels."""
    pixels, boxes, labels = generate_scene(SIZE, SIZE, seed=SEED)
    return tmp_path_factory.mktemp("scaling-scene"), pixels, boxes, labels


def _write(path: Path, pixels: np.ndarray, **profile: object) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=pixels.shape[2],
        height=pixels.shape[1],
        count=pixels.shape[0],
        dtype=pixels.dtype,
        crs="EPSG:32633",
        transform=Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        **profile,
    ) as dst:
        dst.write(pixels)
    return path


Scene = tuple[Path, np.ndarray, np.ndarray, np.ndarray]


def _run(scene: Scene, image: Path, rule: ScalingRule | None = None) -> tuple[Score, int]:
    """Score against the scene's objects and detection count of the demo detector on ``image``."""
    folder, _, known_boxes, known_labels = scene
    out = folder / f"{image.stem}.geojson"
    request = {"image": str(image), "model": str(DEFAULT_MODEL), "outputs": {"path": str(out)}}
    run_image(parse_request(request), providers="cpu", scaling_rule=rule)
    features = json.loads(out.read_text(encoding="utf-8"))["features"]
    boxes = np.array([f["properties"]["pixel_bbox"] for f in features], np.float64).reshape(-1, 4)
    scores = np.array([f["properties"]["score"] for f in features], np.float64)
    classes = {name: i for i, name in enumerate(DEFAULT_CLASSES)}
    labels = np.array([classes.get(f["properties"]["class"], -1) for f in features], np.int64)
    return score_detections(boxes, scores, labels, known_boxes, known_labels), len(features)


@pytest.fixture(scope="module")
def baseline(scene: Scene) -> tuple[Score, int]:
    """The uint8 original: no rule needed (x / 255)."""
    folder, pixels, _, _ = scene
    score = _run(scene, _write(folder / "uint8.tif", pixels))
    assert score[0].true_positives + score[0].false_negatives > 60
    assert score[0].precision > 0.9 and score[0].recall > 0.9, score
    return score


def _close_to(score: Score, baseline: Score) -> None:
    assert score.recall >= baseline.recall - 0.03 and score.precision >= baseline.precision - 0.03, (
        score,
        baseline,
    )


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("float64-0-255", (lambda p: p.astype(np.float64), ScalingRule("range", 0.0, 255.0), "float64")),
        (
            "int16-negative",
            (
                lambda p: p.astype(np.int16) * 8 - OFFSET,
                ScalingRule("range", -OFFSET, 255 * 8 - OFFSET),
                "int16",
            ),
        ),
        (
            "float32-unit",  # the values already are the model's [0, 1] input
            (lambda p: (p / np.float32(255)).astype(np.float32), ScalingRule(mode="none"), "float32"),
        ),
    ],
)
def test_float_and_signed_images_are_refused_without_a_rule_and_right_with_one(
    scene: Scene,
    baseline: tuple[Score, int],
    name: str,
    case: tuple[Callable[[np.ndarray], np.ndarray], ScalingRule, str],
) -> None:
    folder, pixels, _, _ = scene
    convert, rule, refusal = case
    image = _write(folder / f"{name}.tif", convert(pixels))
    with pytest.raises(UserError, match=f"the image is {refusal} with 3 bands") as refused:
        _run(scene, image)
    assert '"scaling": {"mode": "range"' in str(refused.value)
    score, _ = _run(scene, image, rule)
    _close_to(score, baseline[0])


def test_twelve_bit_uint16_runs_by_its_declared_bit_depth_or_a_stated_range(
    scene: Scene, baseline: tuple[Score, int]
) -> None:
    folder, pixels, _, _ = scene
    twelve_bit = np.round(pixels.astype(np.float64) * (4095 / 255)).astype(np.uint16)
    declared = _write(folder / "uint16-nbits12.tif", twelve_bit, nbits=12)
    score, _ = _run(scene, declared)  # no rule: NBITS=12 is the range
    _close_to(score, baseline[0])
    undeclared = _write(folder / "uint16.tif", twelve_bit)
    stated, _ = _run(scene, undeclared, ScalingRule.parse("0,4095"))
    _close_to(stated, baseline[0])


def test_a_single_band_image_is_refused_unless_replication_is_asked_for(
    scene: Scene, baseline: tuple[Score, int]
) -> None:
    folder, pixels, _, _ = scene
    grey = np.round(pixels.mean(axis=0, keepdims=True)).astype(np.uint8)
    image = _write(folder / "grey.tif", grey, nodata=0)
    with pytest.raises(UserError, match="the image has 1 band but the model takes 3 channels") as refused:
        _run(scene, image)
    assert '"bands": "replicate"' in str(refused.value)
    replicated = _run(scene, image, ScalingRule(bands="replicate"))
    # Asked for, the grey band feeds every channel: exactly what the same grey written as RGB gives. A
    # colour detector may find fewer objects in grey; that is the image's content, not the scaling.
    grey_rgb = _write(folder / "grey-rgb.tif", np.repeat(grey, 3, axis=0), nodata=0)
    assert replicated == _run(scene, grey_rgb)
    assert replicated[0].recall > 0.4, replicated  # 49 of 84 when measured
