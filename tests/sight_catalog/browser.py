"""A headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium) as a pytest
fixture, and what the API and web UI tests serve it: a city with a READY model (a tiny ONNX detector whose
boxes are fixed, so a test knows where they must be drawn).

Import the fixture into a test module: ``from browser import chromium  # noqa: F401``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psycopg
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.sight_catalog import warehouse

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = "chromedriver"
#: The browser's window: wide enough for the UI's two columns, device pixels = CSS pixels.
WINDOW = (1280, 1400)

#: The tiny detector's tile, and what it always answers: (box x0, y0, x1, y1 in tile pixels, score, label).
TILE = 64
ROWS: tuple[tuple[tuple[float, float, float, float], float, int], ...] = (
    ((8.0, 4.0, 24.0, 40.0), 0.9, 0),
    ((30.0, 12.0, 60.0, 44.0), 0.6, 1),
    ((2.0, 2.0, 6.0, 6.0), 0.1, 0),  # under every threshold the API uses: never answered
)
CLASSES = ("Eiffel Tower", "Louvre Pyramid")


def fixed_detector(path: Path, classes: Sequence[str] = CLASSES, rows: Sequence[Any] = ROWS) -> Path:
    """A detector (the tessera contract, one ``TILE`` x ``TILE`` RGB tile) that answers ``rows`` for every
    input, whatever its pixels; class names ``classes``. Written to ``path``."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, TILE, TILE])
    k = len(rows)
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "n11"], ["mean3"]),
        helper.make_node("Reshape", ["mean4", "n1"], ["mean2"]),
        helper.make_node("Mul", ["mean3", "zero3"], ["zeros3"]),
        helper.make_node("Mul", ["mean2", "zero2"], ["zeros2"]),
        helper.make_node("Add", ["zeros3", "box_rows"], ["boxes"]),
        helper.make_node("Add", ["zeros2", "score_rows"], ["scores"]),
        helper.make_node("Shape", ["scores"], ["nk"]),
        helper.make_node("Expand", ["class_rows", "nk"], ["labels"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "n11"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "n1"),
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero3"),
        numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero2"),
        numpy_helper.from_array(np.array([[r[0] for r in rows]], np.float32), "box_rows"),
        numpy_helper.from_array(np.array([[r[1] for r in rows]], np.float32), "score_rows"),
        numpy_helper.from_array(np.array([[r[2] for r in rows]], np.int64), "class_rows"),
    ]
    outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", k]),
    ]
    graph = helper.make_graph(nodes, "fixed_sights", [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {
        "tessera.class_names": json.dumps(list(classes)),
        "tessera.name": "fixed-sights",
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def expected_boxes(
    width: int, height: int, min_score: float = 0.3
) -> list[tuple[str, float, tuple[float, ...]]]:
    """What the fixed detector finds on a ``width`` x ``height`` photo (letterboxed into its tile, boxes
    scaled back and clipped to the photo): ``(sight, score, (x0, y0, x1, y1))``, best first."""
    scale = min(TILE / width, TILE / height)
    fit_w, fit_h = max(1, min(TILE, round(width * scale))), max(1, min(TILE, round(height * scale)))
    sx, sy = fit_w / width, fit_h / height
    found = []
    for (x0, y0, x1, y1), score, label in ROWS:
        if score < min_score:
            continue
        box = (x0 / sx, y0 / sy, min(x1 / sx, width), min(y1 / sy, height))
        found.append((CLASSES[label], score, box))
    return sorted(found, key=lambda f: -f[1])


def add_ready_model(
    conn: psycopg.Connection[Any],
    city: warehouse.City,
    model_uri: str,
    classes: Sequence[str] = CLASSES,
    *,
    registry_version: int = 1,
) -> warehouse.Model:
    """A READY model of ``city`` at ``model_uri`` (the city's sights ``classes`` are added too)."""
    for name in classes:
        warehouse.add_sight(conn, city.id, name)
    version = warehouse.next_model_version(conn, city.id)
    model = warehouse.start_model(
        conn,
        city.id,
        training_job_id=f"job-{city.slug}-{version}",
        dataset=f"s3://datasets/catalog/{city.slug}/v{version}",
        classes=list(classes),
        images=12,
        registry_name=f"sights-{city.slug}",
    )
    return warehouse.mark_model_ready(conn, model.id, registry_version=registry_version, model_uri=model_uri)


def _find(names: Sequence[str]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """A headless Chromium at :data:`WINDOW`, device scale 1 (screenshot pixels are CSS pixels), with a fake
    webcam that needs no permission prompt. Skips (saying how to install it) where Chromium is missing."""
    binary, driver_path = _find(CHROMIUM), shutil.which(CHROMEDRIVER)
    if binary is None or driver_path is None:
        pytest.skip("Chromium and chromedriver are not installed: run `bash .ci/system-packages`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
