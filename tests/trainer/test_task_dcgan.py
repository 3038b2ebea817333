"""The dcgan task through a tiny loop of its own: load, build, batches, train steps, resume, evaluate,
sample grid, ONNX export checked with ONNX Runtime, and the errors a user can cause."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_loop
import torch
from PIL import Image
from tiny_loop import CPU, restore, resumed_and_straight, round_trip

from services.errors import UserError
from services.trainer.nets.dcgan import Discriminator, Generator
from services.trainer.tasks.dcgan import DcganTask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"image_size": 64, "batch_size": 4, "nz": 8, "ngf": 4, "ndf": 4, "samples": 4, "eval_images": 6}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten pictures of assorted sizes and formats: a bright disc on a dark ground, in a nested folder."""
    folder = tmp_path_factory.mktemp("pictures")
    (folder / "more").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        height, width = (48, 80) if i % 2 else (90, 70)
        yy, xx = np.mgrid[:height, :width]
        disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 3) ** 2
        pixels = (disc[..., None] * [220, 180, 60] + rng.integers(0, 30, (height, width, 3))).astype(np.uint8)
        target = folder / ("more" if i < 3 else "") / f"p{i}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(pixels).save(target)
    (folder / "notes.txt").write_text("not a picture")
    return folder


# The tiny loop, on batches whose first tensor is 64 x 64 colour images; returns what every step reported.
train = partial(tiny_loop.train, batch_shape=(3, 64, 64))


def test_params_defaults_and_overrides() -> None:
    params = DcganTask().params({"image_size": 128, "lr": 1})
    assert params["image_size"] == 128 and params["lr"] == 1.0 and isinstance(params["lr"], float)
    assert params["nz"] == 100 and params["batch_size"] == 128 and params["seed"] == 0
    assert DcganTask.name == "dcgan"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"image_size": 96}, r"image_size must be one of 64, 128, got 96"),
        ({"batch_size": 0}, r"batch_size must be an integer in \[1, 4096\]"),
        ({"batch_size": True}, r"batch_size must be an integer"),
        ({"lr": 0}, r"lr must be a number in \(0, 1\]"),
        ({"lr": "fast"}, r"lr must be a number"),
        ({"mixed_precision": 1}, r"mixed_precision must be true or false"),
        ({"learning_rate": 0.1}, r"unknown parameter\(s\) learning_rate; known parameters: .*lr"),
    ],
)
def test_bad_params_name_the_parameter(given: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        DcganTask().params(given)


def test_missing_empty_or_unreadable_dataset(tmp_path: Path) -> None:
    task, params = DcganTask(), DcganTask().params(TINY)
    with pytest.raises(UserError, match=r"does not exist.*folder of \.png/\.jpg pictures"):
        task.load(tmp_path / "nowhere", params)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    with pytest.raises(UserError, match=r"is empty; expected a folder of \.png/\.jpg pictures"):
        task.load(tmp_path / "empty", params)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image .*b\.png"):
        task.load(tmp_path / "broken", params)


def test_load_scales_and_crops(pictures: Path) -> None:
    data = DcganTask().load(pictures, DcganTask().params(TINY))
    assert data.images.shape == (10, 3, 64, 64) and data.images.dtype == torch.uint8
    assert len(data.files) == 10 and not any(f.suffix == ".txt" for f in data.files)
    # The disc is centred, so the centre pixel is bright red-yellow and a corner is dark.
    assert data.images[:, 0, 32, 32].min() > 200 and data.images[:, 0, 1, 1].max() < 40


def test_networks_at_both_sizes() -> None:
    for size in (64, 128):
        generator, discriminator = Generator(size, nz=8, ngf=2), Discriminator(size, ndf=2)
        images = generator(torch.randn(3, 8, 1, 1))
        assert images.shape == (3, 3, size, size) and images.abs().max() <= 1.0
        assert discriminator(images).shape == (3,)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in Generator(128, 8, 2).modules()) == 6
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in Generator(64, 8, 2).modules()) == 5


def test_training_is_deterministic_and_the_discriminator_learns(pictures: Path) -> None:
    task = DcganTask()
    params = task.params({**TINY, "lr": 2e-3})
    data = task.load(pictures, params)
    first = train(task, task.build(params, CPU), data, params, range(4))
    again = train(task, task.build(params, CPU), data, params, range(1))
    assert first[: len(again)] == again  # same seed: the very same numbers
    assert len(first) == 12 and set(first[0]) == {"loss_d", "loss_g", "d_real", "d_fake"}
    assert all(math.isfinite(v) for step in first for v in step.values())
    # The discriminator separates these (very regular) pictures from the untrained generator's output.
    early, late = first[0], first[-3:]
    assert np.mean([s["loss_d"] for s in late]) < early["loss_d"]
    assert np.mean([s["d_real"] - s["d_fake"] for s in late]) > early["d_real"] - early["d_fake"]
    other = train(task, task.build(task.params({**TINY, "seed": 1}), CPU), data, params, range(1))
    assert other[0] != first[0]


def test_resumed_job_follows_the_same_trajectory(pictures: Path) -> None:
    task = DcganTask()
    params = task.params(TINY)
    data = task.load(pictures, params)
    resumed, straight = resumed_and_straight(train, task, data, params, stop=1, end=3)
    assert resumed == straight


def test_fixed_noise_survives_a_checkpoint(pictures: Path, tmp_path: Path) -> None:
    task = DcganTask()
    params = task.params(TINY)
    data = task.load(pictures, params)
    state = task.build(params, CPU)
    train(task, state, data, params, range(1))
    (grid,) = task.pictures(state, tmp_path / "before", params)
    assert grid.name == "dcgan-samples.png"
    picture = np.asarray(Image.open(grid))
    assert picture.shape == (2 + 2 * 66, 2 + 2 * 66, 3)  # four samples: 2 x 2 grid of 64 px with 2 px gaps

    # A state built from another seed has other noise and weights until the checkpoint is restored.
    resumed = task.build(task.params({**TINY, "seed": 7}), CPU)
    assert not torch.equal(resumed.extra["fixed_noise"], state.extra["fixed_noise"])
    restore(resumed, round_trip(state))
    (again,) = task.pictures(resumed, tmp_path / "after", params)
    assert np.array_equal(np.asarray(Image.open(again)), picture)
    # Drawing the grid changes nothing: the next step is the same either way.
    assert state.models["generator"].training


def test_evaluate_leaves_the_state_alone(pictures: Path) -> None:
    task = DcganTask()
    params = task.params(TINY)
    data = task.load(pictures, params)
    state = task.build(params, CPU)
    train(task, state, data, params, range(1))
    weights = {k: v.clone() for k, v in state.models["discriminator"].state_dict().items()}
    metrics = task.evaluate(state, data, params)
    assert set(metrics) == {"d_real", "d_fake", "loss_d", "loss_g"}
    assert 0 < metrics["d_real"] < 1 and 0 < metrics["d_fake"] < 1
    assert metrics["loss_d"] == pytest.approx(
        -np.log(metrics["d_real"]) - np.log(1 - metrics["d_fake"]), rel=0.5
    )
    assert all(torch.equal(v, state.models["discriminator"].state_dict()[k]) for k, v in weights.items())
    assert task.evaluate(state, data, params) == metrics


def test_export_matches_torch(pictures: Path, tmp_path: Path) -> None:
    task = DcganTask()
    params = task.params(TINY)
    data = task.load(pictures, params)
    state = task.build(params, CPU)
    train(task, state, data, params, range(1))
    check = task.export(state, tmp_path, params)
    assert check.path == tmp_path / "dcgan.onnx"
    meta = {p.key: p.value for p in onnx.load(str(check.path)).metadata_props}
    assert (
        meta["tessera.task"] == "dcgan"
        and meta["tessera.nz"] == "8"
        and meta["tessera.image_size"] == "64x64"
    )

    session = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["noise"]
    assert [o.name for o in session.get_outputs()] == ["images"]
    (images,) = session.run(["images"], check.inputs)
    assert images.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(images, check.expected["images"], atol=check.atol)
    # The expected images are the trained generator's (evaluation mode), not some other network's.
    generator = state.models["generator"].eval()
    with torch.no_grad():
        torch_images = generator(torch.from_numpy(check.inputs["noise"])).numpy()
    np.testing.assert_allclose(images, torch_images, atol=1e-4)
    # Dynamic batch.
    (three,) = session.run(
        ["images"], {"noise": np.random.default_rng(1).standard_normal((3, 8, 1, 1), np.float32)}
    )
    assert three.shape == (3, 3, 64, 64)


def test_mixed_precision_path_runs(pictures: Path) -> None:
    """The grad-scaler path (CUDA's in production) driven on the CPU: scaled steps train the networks."""
    task = DcganTask()
    params = task.params(TINY)
    assert task.build(params, CPU).scalers == {}  # no scaler off CUDA
    data = task.load(pictures, params)
    state = task.build(params, CPU)
    state.scalers["amp"] = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    weights = [p.detach().clone() for p in state.models["generator"].parameters()]
    losses = train(task, state, data, params, range(1))
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert not all(
        torch.equal(a, b) for a, b in zip(weights, state.models["generator"].parameters(), strict=True)
    )
    assert state.scalers["amp"].get_scale() > 0
