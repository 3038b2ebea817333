"""``tessera sights demo`` end to end, small: the embedded default (moto + PostgreSQL), generated photos
ingested and labelled, a trainer worker and the catalog's refresher as processes training the city's model
through the training-jobs queue, the held-out photos recognised through the API process. What its user
sees is checked against what the platform holds: the model READY and registered by its training job, every
recognition in the API's own log, precision and recall recomputed from the answers and the truth drawn
again from the generator, the picture's boxes, no process left; and a second run, through the command
line into a fresh folder, works too, serves the web UI and stops everything at Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.cloud.database import connect
from services.cloud.embedded import EmbeddedPlatform
from services.errors import UserError
from services.registry import list_versions
from services.scenes.scoring import Score, score_detections
from services.sight_catalog import warehouse
from services.sight_catalog.demo import LABELLER, DemoSettings, check, run_demo, sight_names
from services.sight_catalog.demo_figures import _FOUND, _TRUE, _WRONG, IOU
from services.sight_catalog.photos import draw_photo

ROOT = Path(__file__).resolve().parents[2]
#: Three sights, 30 photos (6 held out), a few dozen training steps: the loop, not the model's quality.
SMALL = DemoSettings(photos=30, sights=3, steps=40, seed=5, timeout_s=240.0, serve=False)


@dataclass
class Ran:
    """One demo run and what the platform held after it."""

    status: int
    printed: str
    seconds: float
    out: Path
    result: dict[str, Any]
    models: list[warehouse.Model]
    registered: list[Any]
    job: tuple[Any, ...] | None
    labellers: dict[str, int]
    held_out: set[int]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("sights-demo") / "out"
    platform = EmbeddedPlatform().start()
    try:
        printed = io.StringIO()
        started = time.monotonic()
        with redirect_stdout(printed):  # what `tessera sights demo` prints (its console is stdout)
            status = run_demo(replace(SMALL, out_dir=out), platform=platform)
        seconds = time.monotonic() - started
        result = json.loads((out / "result.json").read_text())
        with connect(platform.database_url) as conn:
            city = warehouse.get_city(conn, "Paris")
            models = warehouse.list_models(conn, city.id)
            registered = list_versions(conn, "sights-paris")
            job = conn.execute(
                "SELECT status, step FROM training_jobs WHERE id = %s", (result["model"]["training_job_id"],)
            ).fetchone()
            labellers = dict(
                conn.execute(
                    "SELECT l.labeller, count(*) FROM sight_labellings l"
                    " JOIN sight_images i ON i.id = l.image_id WHERE i.city_id = %s GROUP BY l.labeller",
                    (city.id,),
                ).fetchall()
            )
            held_out = {
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM sight_images WHERE city_id = %s AND held_out", (city.id,)
                ).fetchall()
            }
        yield Ran(
            status, printed.getvalue(), seconds, out, result, models, registered, job, labellers, held_out
        )
    finally:
        platform.stop()


def test_the_refresher_trains_the_city_through_the_queue_and_the_model_is_registered(ran: Ran) -> None:
    assert ran.status == 0
    (model,) = ran.models
    assert (model.status, model.version, model.registry_name) == ("READY", 1, "sights-paris")
    # Registered by the training job the refresher sent, which the trainer worker ran to the end.
    (version,) = ran.registered
    assert version.job_id == model.training_job_id and version.uri == model.model_uri
    assert ran.job is not None and ran.job[0] == "SUCCESS" and ran.job[1] == SMALL.steps
    assert ran.result["model"]["registry_version"] == model.registry_version == version.version
    assert sorted(model.classes) == sorted(sight_names("Paris", check(SMALL)).values())
    # Trained on the labelled photos only: the held-out ones were not labelled and not exported.
    assert model.images == ran.result["training_photos"] == SMALL.photos - len(ran.held_out)
    # The annotator labelled the training photos; the refresher may have labelled held-out ones with the new
    # model before the workers were stopped (as it would any unlabelled photo), never more.
    assert ran.labellers[LABELLER] == ran.result["labelled"]
    assert set(ran.labellers) <= {LABELLER, "model:sights-paris@1"}
    assert ran.labellers.get("model:sights-paris@1", 0) <= len(ran.held_out)
    assert ran.result["labelled"] == ran.result["training_photos"]
    assert {p["image_id"] for p in ran.result["per_photo"]} == ran.held_out
    logs = ran.out / "logs"
    assert model.training_job_id in (logs / "trainer-1.log").read_text()
    assert "READY" in (logs / "refresher-1.log").read_text()
    text = " ".join(ran.printed.split())
    assert "annotator:generator" in text and "no Rekognition offline" in text
    assert f"v1 READY as sights-paris:{version.version}" in text


def test_every_held_out_photo_was_recognised_through_the_api(ran: Ran) -> None:
    log = (ran.out / "logs" / "api.log").read_text()
    posts = re.findall(r'"POST /api/cities/paris/recognitions HTTP/1.1" 200', log)
    # One warm-up call (a training photo, not scored) and one per held-out photo.
    assert len(posts) == len(ran.held_out) + 1 == ran.result["recognitions"] + 1
    assert ran.result["api"].startswith("http://127.0.0.1:")
    for photo in ran.result["per_photo"]:
        assert photo["model_version"] == 1
        assert (photo["width"], photo["height"]) == SMALL.size  # upright, EXIF turned ones included
    assert any(p["orientation"] for p in ran.result["per_photo"]) or ran.result["held_out_photos"] < 7


def test_precision_and_recall_are_recomputed_from_the_generator(ran: Ran) -> None:
    names = sight_names("Paris", check(SMALL))
    kinds = list(names)
    total = Score(0, 0, 0)
    for photo in ran.result["per_photo"]:
        # The truth drawn again from the photo's seed, not the demo's bookkeeping.
        drawn = draw_photo(photo["seed"], kinds=kinds, main=photo["main"], size=SMALL.size)
        truth = [(names[m.kind], list(m.box)) for m in drawn.landmarks]
        assert [(t["sight"], t["box"]) for t in photo["truth"]] == truth
        found = photo["found"]
        score = score_detections(
            np.array([[f["box"][k] for k in ("x0", "y0", "x1", "y1")] for f in found], np.float64),
            np.array([f["score"] for f in found], np.float64),
            np.array([f["sight"] for f in found], object),
            np.array([box for _, box in truth], np.float64),
            np.array([sight for sight, _ in truth], object),
            iou_threshold=IOU,
        )
        assert (score.true_positives, score.false_positives, score.false_negatives) == (
            photo["true_positives"],
            photo["false_positives"],
            photo["false_negatives"],
        )
        total = total + score
    result = ran.result
    assert (result["true_positives"], result["false_positives"], result["false_negatives"]) == (
        total.true_positives,
        total.false_positives,
        total.false_negatives,
    )
    assert result["precision"] == pytest.approx(total.precision)
    assert result["recall"] == pytest.approx(total.recall)
    text = " ".join(ran.printed.split())
    found_count = total.true_positives + total.false_positives
    known = total.true_positives + total.false_negatives
    assert f"{total.true_positives} of {found_count} detections right ({total.precision:.1%})" in text
    assert f"{total.true_positives} of {known} sights found ({total.recall:.1%})" in text
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert result["recognitions_per_second"] > 0


def test_the_picture_shows_the_true_and_the_found_boxes(ran: Ran) -> None:
    picture = ran.out / "recognitions.png"
    assert ran.result["files"]["recognitions"] == str(picture)
    pixels = np.asarray(Image.open(picture).convert("RGB"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert _TRUE in colours  # the generator's boxes
    if any(p["found"] for p in ran.result["per_photo"][:8]):
        assert _FOUND in colours or _WRONG in colours  # the API's


def test_no_process_is_left_running(ran: Ran) -> None:
    assert set(ran.result["pids"]) == {"trainer", "refresher", "api"}
    for pid in ran.result["pids"].values():
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still running"
    assert _children("services.cli") == []


def test_a_second_run_in_a_fresh_folder_serves_the_web_ui_until_ctrl_c(tmp_path: Path, ran: Ran) -> None:
    out = tmp_path / "again"
    command = [sys.executable, "-m", "services.cli", "sights", "demo", "--out-dir", str(out)]
    command += ["--photos", "15", "--sights", "2", "--steps", "10", "--seed", "6", "--city", "Lyon"]
    printed = tmp_path / "printed.txt"
    with printed.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while "Ctrl-C stops" not in " ".join(printed.read_text().split()):
                assert process.poll() is None, printed.read_text()[-3000:]
                assert time.monotonic() < deadline, printed.read_text()[-3000:]
                time.sleep(0.5)
            text = printed.read_text()
            found = re.search(r"web UI: (http://127\.0\.0\.1:\d+)/", text)
            assert found, text
            with urllib.request.urlopen(f"{found[1]}/", timeout=10) as page:
                assert page.status == 200 and b"<html" in page.read().lower()
            with urllib.request.urlopen(f"{found[1]}/api/cities/lyon", timeout=10) as city:
                assert json.loads(city.read())["status"]["model_version"] == 1
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=60) == 130
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "interrupted; workers, the API and the servers are stopped" in " ".join(
        printed.read_text().split()
    )
    result = json.loads((out / "result.json").read_text())
    assert result["city"] == "Lyon" and result["model"]["status"] == "READY"
    assert result["sights"] == {"tower": "Tower", "arch": "Arch"}
    assert result["recognitions"] == result["held_out_photos"] == 3
    assert (out / "recognitions.png").is_file()
    for pid in result["pids"].values():
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sights": 7}, "--sights must be 1 to 6"),
        ({"photos": 9, "sights": 2}, "--photos must be at least 10"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"timeout_s": 0.0}, "--timeout must be over 0"),
        ({"seed": -1}, "--seed must be 0 or more"),
        ({"city": "  "}, "city"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        check(replace(SMALL, **changes))


def test_a_folder_it_did_not_make_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "sights", "demo", "--out-dir", str(tmp_path), "--no-serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "did not make" in done.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _children(marker: str) -> list[str]:
    """Command lines of this process's children that contain ``marker``."""
    mine = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = stat.read_text().rsplit(")", 1)[1].split()[1]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if parent == mine and marker in command:
            found.append(command)
    return found
