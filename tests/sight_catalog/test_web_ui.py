"""The web UI in a real headless Chromium (Selenium driving Debian's chromium and chromium-driver) against the
catalog on a loopback uvicorn server, PostgreSQL and moto: pick a city, see its status, recognise a generated
photo (picked, dropped, or a frame of Chromium's fake webcam), and find the boxes drawn where the API put
them, in the screenshot's pixels."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from browser import CLASSES, add_ready_model, chromium, expected_boxes, fixed_detector  # noqa: F401
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from services.sight_catalog import ingest, warehouse
from services.sight_catalog.api import RunningServer, Settings, create_app
from services.sight_catalog.photos import draw_photo
from services.sight_catalog.recognition import Recogniser

#: The box colour the UI strokes (#ff00ff).
MAGENTA = np.array([255, 0, 255])
WAIT_S = 15


@pytest.fixture
def site(
    conn: psycopg.Connection[Any], database_url: str, datasets: str, s3: Any, tmp_path: Path
) -> Iterator[str]:
    """The catalog on loopback (no token): Paris with two photos, a READY model (the fixed detector) and
    version 2 training; Rome with nothing yet. Yields its URL."""
    paris, _ = warehouse.request_city(conn, "Paris")
    warehouse.request_city(conn, "Rome")
    add_ready_model(conn, paris, str(fixed_detector(tmp_path / "paris.onnx")))
    warehouse.start_model(
        conn,
        paris.id,
        training_job_id="job-paris-2",
        dataset="s3://d/paris/v2",
        classes=list(CLASSES),
        images=30,
        registry_name="sights-paris",
    )
    items = [
        ingest.Item(f"photo-{seed}", "Eiffel Tower", None, lambda _, s=seed: ingest.Fetched(_photo(s), None))
        for seed in (21, 22)
    ]
    report = ingest.ingest(conn, paris, items, bucket=datasets, s3_client=s3)
    assert len(report.accepted) == 2
    settings = Settings(database_url=database_url, bucket=datasets)
    server = RunningServer(create_app(settings, recogniser=Recogniser(providers="cpu")))
    yield server.url
    server.stop()


def _photo(seed: int) -> bytes:
    return draw_photo(seed).png()


def _wait(driver: Any, condition: Any, what: str) -> Any:
    return WebDriverWait(driver, WAIT_S).until(condition, message=f"waiting for {what}")


def _text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _open_city(driver: Any, url: str, name: str) -> None:
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element(By.ID, "city").get_attribute("data-loaded") == "2", "the cities")
    Select(driver.find_element(By.ID, "city")).select_by_visible_text(name)
    _wait(driver, lambda d: _text(d, "city-name") == name, f"{name}'s status")


def _canvas(driver: Any) -> np.ndarray:
    """The result canvas as the screen shows it (RGB), from a screenshot of the element."""
    png = driver.find_element(By.ID, "result").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _is_box(pixel: np.ndarray) -> bool:
    return bool(np.abs(pixel - MAGENTA).max() <= 60)


def _check_boxes(shot: np.ndarray, width: int, height: int, photo: np.ndarray | None) -> None:
    """Every expected box's four edges are stroked in magenta, its inside is not, and (given the photo) the
    rest of the canvas is the photo."""
    assert shot.shape[:2] == (height, width)
    boxes = [box for _, _, box in expected_boxes(width, height)]
    assert len(boxes) == 2
    for x0, y0, x1, y1 in boxes:
        xm, ym = int((x0 + x1) / 2), int((y0 + y1) / 2)
        edges = {
            "left": shot[ym, round(x0)],
            "right": shot[ym, min(width - 1, round(x1))],
            "top": shot[round(y0), xm],
            "bottom": shot[min(height - 1, round(y1)), xm],
        }
        assert all(_is_box(p) for p in edges.values()), {k: p.tolist() for k, p in edges.items()}
        assert not _is_box(shot[ym, xm]), "a box's inside is the photo, not the stroke"
    if photo is not None:
        # Away from the boxes and their labels the canvas is the photo (a lossless PNG, drawn 1:1).
        mask = np.ones((height, width), bool)
        for x0, y0, x1, y1 in boxes:
            mask[max(0, int(y0) - 22) : int(y1) + 4, max(0, int(x0) - 4) : int(x1) + 4] = False
        difference = np.abs(shot - photo)[mask].mean()
        assert mask.sum() > 0.2 * width * height and difference < 4, difference


def test_pick_a_city_see_its_status_and_the_sights_drawn_on_a_photo(
    chromium: Any,  # noqa: F811
    site: str,
    tmp_path: Path,
) -> None:
    driver = chromium
    _open_city(driver, site, "Paris")
    status = driver.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "ready"
    assert (_text(driver, "status-images"), _text(driver, "status-sights")) == ("2", "2")
    assert (_text(driver, "status-model"), _text(driver, "status-training")) == ("1", "yes (version 2)")
    rows = driver.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    assert [r.text.split()[:2] for r in rows] == [["2", "TRAINING"], ["1", "READY"]]

    photo_path = tmp_path / "notre-photo.png"
    photo_path.write_bytes(_photo(5))
    driver.find_element(By.ID, "file").send_keys(str(photo_path))
    _wait(driver, lambda d: d.find_element(By.ID, "result").get_attribute("data-boxes") == "2", "the boxes")
    items = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#sights li")]
    assert items == ["Eiffel Tower: 90.0%", "Louvre Pyramid: 60.0%"]
    assert "2 sights found by model version 1" in _text(driver, "message")
    photo = np.asarray(Image.open(photo_path).convert("RGB")).astype(int)
    _check_boxes(_canvas(driver), 384, 288, photo)
    # The whole page too (kept under the test's tmp_path): the canvas where the layout put it.
    page = tmp_path / "recognised.png"
    assert driver.save_screenshot(str(page))
    rect = driver.execute_script("return document.getElementById('result').getBoundingClientRect().toJSON();")
    left, top = round(rect["x"]), round(rect["y"])
    whole = np.asarray(Image.open(page).convert("RGB")).astype(int)
    _check_boxes(whole[top : top + 288, left : left + 384], 384, 288, photo)

    # Also stored: the city now holds three images, and the same photo again is a duplicate.
    driver.find_element(By.ID, "store").click()
    driver.find_element(By.ID, "file").send_keys(str(photo_path))
    _wait(driver, lambda d: _text(d, "status-images") == "3", "the new image count")
    driver.find_element(By.ID, "file").send_keys(str(photo_path))
    _wait(driver, lambda d: "has this photo already" in _text(d, "message"), "the duplicate")


def test_a_dropped_photo_and_a_city_without_a_model(chromium: Any, site: str) -> None:  # noqa: F811
    driver = chromium
    _open_city(driver, site, "Rome")
    assert driver.find_element(By.ID, "status").get_attribute("data-state") == "no-images"
    assert _text(driver, "status-model") == "none"
    driver.execute_script(
        """
        const [b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        const event = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
        document.getElementById("drop").dispatchEvent(event);
        """,
        base64.b64encode(_photo(7)).decode("ascii"),
        "dropped.png",
    )
    _wait(
        driver, lambda d: d.find_element(By.ID, "result").get_attribute("data-boxes") == "error", "the error"
    )
    message = driver.find_element(By.ID, "message")
    assert "Rome has no model" in message.text and "error" in (message.get_attribute("class") or "")
    assert driver.find_elements(By.CSS_SELECTOR, "#sights li") == []

    # Request a city from the UI: it is picked at once.
    driver.find_element(By.ID, "new-city").send_keys("Kyoto")
    driver.find_element(By.CSS_SELECTOR, "#request-city button").click()
    _wait(driver, lambda d: _text(d, "city-name") == "Kyoto", "the new city")
    assert Select(driver.find_element(By.ID, "city")).first_selected_option.text == "Kyoto"
    assert "#city=kyoto" in driver.current_url


def test_a_webcam_frame_is_recognised(chromium: Any, site: str) -> None:  # noqa: F811
    driver = chromium
    _open_city(driver, site, "Paris")
    start = driver.find_element(By.ID, "webcam-start")
    assert start.is_displayed()  # the browser offers a camera (Chromium's fake one here)
    start.click()
    _wait(
        driver, lambda d: d.execute_script("return document.getElementById('webcam').videoWidth") > 0, "video"
    )
    driver.find_element(By.ID, "webcam-capture").click()
    _wait(driver, lambda d: d.find_element(By.ID, "result").get_attribute("data-boxes") == "2", "the boxes")
    # The frame's size as the API saw it (the fake camera's resolution is its own business).
    width, height = (
        int(v) for v in driver.find_element(By.ID, "result").get_attribute("data-photo").split("x")
    )
    assert width >= 160 and height >= 120
    scale = min(1.0, 720 / width)
    shown_w, shown_h = round(width * scale), round(height * scale)
    shot = _canvas(driver)
    assert shot.shape[:2] == (shown_h, shown_w)
    for _, _, (x0, y0, _x1, y1) in expected_boxes(width, height):
        ym = int((y0 + y1) / 2 * scale)
        assert _is_box(shot[ym, round(x0 * scale)]), shot[ym, round(x0 * scale)].tolist()


def test_the_docs_page_lists_the_api_offline(chromium: Any, site: str) -> None:  # noqa: F811
    driver = chromium
    driver.get(site + "/docs")
    _wait(
        driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.operation")) >= 10, "the operations"
    )
    titles = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "article.operation h3")]
    assert "POST /api/cities/{city}/recognitions" in titles and "GET /ready" in titles
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map((r) => r.name);")
    assert loaded and all(str(name).startswith(site) for name in loaded)  # nothing from elsewhere
