"""The sky-position task through a tiny loop of its own: the manifest (CSV and JSON lines), time features,
the great-circle loss on known city pairs, training, resumption, evaluation and the two-input ONNX export."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_loop
import torch
from PIL import Image
from tiny_loop import CPU, resumed_and_straight

from services.errors import UserError
from services.trainer.data.sky_manifest import parse_time, read_manifest, time_features
from services.trainer.nets.sky import EARTH_RADIUS_KM, SkyPositionNet, great_circle_km
from services.trainer.task import TrainState
from services.trainer.tasks.sky_position import SkyPositionTask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"image_size": 64, "width": 4, "hidden": 32, "batch_size": 8, "lr": 3e-3, "val_fraction": 0.25}
LONDON, PARIS = (51.5074, -0.1278), (48.8566, 2.3522)
NEW_YORK, LOS_ANGELES = (40.7128, -74.0060), (34.0522, -118.2437)


@pytest.fixture(scope="module")
def skies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 skies over Europe with manifest.csv: faint stars, and a bright 'moon' whose place in the frame
    follows the observer's position (a learnable stand-in for real star fields)."""
    folder = tmp_path_factory.mktemp("skies")
    (folder / "img").mkdir()
    rng = np.random.default_rng(11)
    rows = []
    for i in range(24):
        lat, lon = rng.uniform(30, 60), rng.uniform(-20, 40)
        sky = rng.normal(10, 3, (64, 64))
        for y, x in rng.integers(0, 64, (12, 2)):
            sky[y, x] += 120
        cy, cx = 8 + (60 - lat) / 30 * 48, 8 + (lon + 20) / 60 * 48
        yy, xx = np.mgrid[:64, :64]
        sky += 230 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18)
        name = f"img/sky{i:02d}.png"
        Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8)).save(folder / name)
        when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(hours=float(rng.uniform(0, 24 * 365)))
        rows.append({"file": name, "lat": f"{lat:.4f}", "lon": f"{lon:.4f}", "time": when.isoformat()})
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "lat", "lon", "time", "note"])
        writer.writeheader()
        writer.writerows({**row, "note": "generated"} for row in rows)
    return folder


def train(
    task: SkyPositionTask, state: TrainState, data: Any, params: Mapping[str, Any], epochs: range
) -> list[float]:
    """The tiny loop, on batches of 64 x 64 grey images; returns the loss of every step."""
    steps = tiny_loop.train(task, state, data, params, epochs, batch_shape=(1, 64, 64))
    return [step["loss"] for step in steps]


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The textbook haversine formula, in float64, as an independent reference."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return float(great_circle_km(torch.tensor([a]), torch.tensor([b]))[0])


def test_great_circle_on_known_city_pairs() -> None:
    assert distance(LONDON, PARIS) == pytest.approx(343.6, abs=1.0)
    assert distance(NEW_YORK, LOS_ANGELES) == pytest.approx(3936, abs=5)
    assert distance(PARIS, LONDON) == pytest.approx(distance(LONDON, PARIS))
    assert distance((0.0, 179.0), (0.0, -179.0)) == pytest.approx(222.4, abs=0.5)  # across the dateline
    assert distance((10.0, 20.0), (-10.0, -160.0)) == pytest.approx(math.pi * EARTH_RADIUS_KM, rel=1e-5)
    assert distance(LONDON, LONDON) < 0.01
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = (float(rng.uniform(-90, 90)), float(rng.uniform(-180, 180)))
        b = (float(rng.uniform(-90, 90)), float(rng.uniform(-180, 180)))
        assert distance(a, b) == pytest.approx(haversine_km(a, b), rel=1e-4, abs=0.05)


def test_great_circle_gradients_stay_finite() -> None:
    predicted = torch.tensor([list(LONDON), list(LONDON), [10.0, 20.0], [89.9999, 0.0]], requires_grad=True)
    target = torch.tensor([list(LONDON), list(PARIS), [-10.0, -160.0], [90.0, 0.0]])
    great_circle_km(predicted, target).sum().backward()
    assert predicted.grad is not None and torch.isfinite(predicted.grad).all()
    # Moving London towards Paris shortens the distance: the gradient points away from Paris.
    assert predicted.grad[1, 0] > 0 and predicted.grad[1, 1] < 0


def test_time_features() -> None:
    j2000 = datetime(2000, 1, 1, 12, 0, tzinfo=UTC)
    (features,) = time_features([j2000])
    day = 2 * math.pi * 0.5 / 365.2422
    gmst = math.radians(280.46061837)
    expected = [math.sin(day), math.cos(day), 0.0, -1.0, math.sin(gmst), math.cos(gmst)]
    np.testing.assert_allclose(features, expected, atol=1e-6)
    # One sidereal day later the sidereal angle is back where it was; one solar day later it is ~1 deg on.
    sidereal_day = timedelta(seconds=86164.0905)
    later = time_features([j2000 + sidereal_day, j2000 + timedelta(days=1)])
    np.testing.assert_allclose(later[0, 4:], features[4:], atol=1e-5)
    assert math.degrees(math.atan2(later[1, 4], later[1, 5]) - math.atan2(features[4], features[5])) == (
        pytest.approx(0.9856, abs=1e-3)
    )
    assert parse_time("2024-03-20T23:15:00+02:00") == datetime(2024, 3, 20, 21, 15, tzinfo=UTC)
    assert parse_time("2024-03-20T21:15:00Z") == parse_time("2024-03-20T21:15:00")


def test_manifest_json_lines(tmp_path: Path) -> None:
    Image.new("L", (30, 20)).save(tmp_path / "a.png")
    lines = [
        json.dumps({"file": "a.png", "lat": -33.9, "lon": 351.0, "time": "2024-06-01T02:00:00Z", "alt": 5}),
        "",
        json.dumps({"file": "a.png", "lat": 12, "lon": -70, "time": "2024-06-01T04:00:00-03:00"}),
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines))
    first, second = read_manifest(tmp_path)
    assert first.file == tmp_path / "a.png" and first.lat == -33.9 and first.lon == pytest.approx(-9.0)
    assert second.time == datetime(2024, 6, 1, 7, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"has no manifest; expected a folder of sky images with manifest\.csv or manifest\.jsonl"),
        ("file,lat,time\n", r"header lacks column\(s\) lon"),
        ("file,lat,lon,time\n", r"lists no images"),
        ("file,lat,lon,time\na.png,95,0,2024-01-01T00:00:00Z\n", r"line 2: lat 95.0 is outside \[-90, 90\]"),
        ("file,lat,lon,time\na.png,10,0,yesterday\n", r"line 2: .*time ISO-8601 UTC"),
        ("file,lat,lon,time\nb.png,10,0,2024-01-01T00:00:00Z\n", r"line 2: image b\.png does not exist"),
        ("file,lat,lon,time,split\na.png,10,0,2024-01-01T00:00:00Z,test\n", r"split 'test' is not one"),
        (
            "file,lat,lon,time,split\na.png,10,0,2024-01-01T00:00:00Z,held_out\n",
            r"holds out every shot; mark some 'train'",
        ),
    ],
)
def test_manifest_errors(tmp_path: Path, content: str | None, message: str) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    if content is not None:
        (tmp_path / "manifest.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        SkyPositionTask().load(tmp_path, SkyPositionTask().params(TINY))


def test_the_manifest_split_column_fixes_the_held_out_shots(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    splits = ["held_out", "", "train", "held_out", "", ""]
    rows = "".join(f"a.png,{10 + i},0,2024-01-01T00:00:00Z,{split}\n" for i, split in enumerate(splits))
    (tmp_path / "manifest.csv").write_text("file,lat,lon,time,split\n" + rows)
    for seed in (0, 1):  # the seed and val_fraction choose nothing when the manifest names the split
        data = SkyPositionTask().load(tmp_path, SkyPositionTask().params({**TINY, "seed": seed}))
        assert data.held_out.tolist() == [0, 3] and data.training.tolist() == [1, 2, 4, 5]


def test_missing_dataset_and_bad_params(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"nowhere does not exist or is not a directory; expected a folder of sky"
    ):
        SkyPositionTask().load(tmp_path / "nowhere", SkyPositionTask().params(TINY))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"image_size": 100}, r"image_size must be an integer in \[64, 1024\], a multiple of 64, got 100"),
        ({"channels": 2}, r"channels must be one of 1, 3, got 2"),
        ({"lr": -1.0}, r"lr must be a number in \(0, 1\]"),
        ({"val_fraction": "half"}, r"val_fraction must be a number"),
    ]
    for given, message in cases:
        with pytest.raises(UserError, match=message):
            SkyPositionTask().params(given)
    assert SkyPositionTask().params({})["image_size"] == 128 and SkyPositionTask.name == "sky-position"


def test_network_output_ranges() -> None:
    torch.manual_seed(0)
    model = SkyPositionNet(channels=3, width=2, hidden=8)
    with torch.no_grad():
        for layer in model.head:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(100.0)  # push the raw outputs far out
        latlon = model(torch.rand(16, 3, 64, 64), torch.rand(16, 6))
    assert latlon.shape == (16, 2)
    assert (latlon[:, 0].abs() <= 90).all() and (latlon[:, 1].abs() <= 180).all()


def test_training_reduces_the_error(skies: Path) -> None:
    task = SkyPositionTask()
    params = task.params(TINY)
    data = task.load(skies, params)
    assert data.images.shape == (24, 1, 64, 64) and data.times.shape == (24, 6)
    assert len(data.held_out) == 6 and len(data.training) == 18
    state = task.build(params, CPU)
    before = task.evaluate(state, data, params)
    losses = train(task, state, data, params, range(15))
    after = task.evaluate(state, data, params)
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert (
        set(after) == {"mean_error_km", "median_error_km", "held_out_images"}
        and after["held_out_images"] == 6
    )
    assert after["mean_error_km"] < 0.5 * before["mean_error_km"]
    assert after["median_error_km"] > 0
    assert train(task, task.build(params, CPU), data, params, range(2)) == losses[:6]


def test_resumed_job_follows_the_same_trajectory(skies: Path) -> None:
    task = SkyPositionTask()
    params = task.params(TINY)
    data = task.load(skies, params)
    resumed, straight = resumed_and_straight(train, task, data, params, stop=2, end=4)
    assert resumed == straight


def test_export_matches_torch(skies: Path, tmp_path: Path) -> None:
    task = SkyPositionTask()
    params = task.params(TINY)
    data = task.load(skies, params)
    state = task.build(params, CPU)
    train(task, state, data, params, range(2))
    check = task.export(state, tmp_path, params)
    assert check.path.name == "sky-position.onnx"
    meta = {p.key: p.value for p in onnx.load(str(check.path)).metadata_props}
    assert json.loads(meta["tessera.time_features"])[4:] == ["sin_gmst", "cos_gmst"]
    assert meta["tessera.input_size"] == "64x64" and meta["tessera.input_scale"] == "1/255"

    session = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "time"]
    assert [o.name for o in session.get_outputs()] == ["latlon"]
    (latlon,) = session.run(["latlon"], check.inputs)
    np.testing.assert_allclose(latlon, check.expected["latlon"], atol=check.atol)
    images, times = (data.images[:5].float() / 255).numpy(), data.times[:5].numpy()
    (real,) = session.run(["latlon"], {"image": images, "time": times})
    model = state.models["sky"].eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            real, model(torch.from_numpy(images), torch.from_numpy(times)).numpy(), atol=1e-3
        )
    assert real.shape == (5, 2)
