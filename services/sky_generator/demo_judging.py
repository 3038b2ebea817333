"""The sky demo's judgement: the trainer's sky-position task trained on the rendered frames (its own
``tessera train`` process), the exported model scored on the held-out frames against the baseline that
always answers the centre of the region, a paired bootstrap interval of the difference, and, when the
model is no better, a learning curve and the size it suggests (:func:`score`, :func:`verdict`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.celnav import KM_PER_NM, haversine_km, time_features
from services.sky_generator.demo_picture import draw_positions

if TYPE_CHECKING:
    from services.sky_generator.demo import DemoResult, DemoSettings

#: Shares of the training frames the learning curve is also trained on (the whole set is the main run).
CURVE_FRACTIONS = (0.25, 0.5)
#: Below this learning-curve exponent the error is taken as not falling with more frames.
MIN_EXPONENT = 0.02
BOOTSTRAP = 2000
MAX_ESTIMATE = 10_000_000


@dataclass(frozen=True)
class Errors:
    """Great-circle errors over the held-out frames."""

    mean_km: float
    median_km: float

    @property
    def mean_nm(self) -> float:
        """The mean in nautical miles."""
        return self.mean_km / KM_PER_NM

    @property
    def median_nm(self) -> float:
        """The median in nautical miles."""
        return self.median_km / KM_PER_NM

    def to_json(self) -> dict[str, float]:
        """km and nm, mean and median."""
        return {
            "mean_km": self.mean_km,
            "median_km": self.median_km,
            "mean_nm": self.mean_nm,
            "median_nm": self.median_nm,
        }

    @classmethod
    def of(cls, km: np.ndarray) -> Errors:
        """The figures of per-frame errors in km."""
        return cls(mean_km=float(np.mean(km)), median_km=float(np.median(km)))


def region_centre(latitude: Sequence[float], longitude: Sequence[float]) -> tuple[float, float]:
    """The middle of a latitude band and a longitude band (across the antimeridian when low > high)."""
    low, high = longitude
    width = high - low if low <= high else high - low + 360.0
    lon = low + width / 2
    return (latitude[0] + latitude[1]) / 2, lon - 360.0 if lon > 180.0 else lon


def score(
    result: DemoResult,
    settings: DemoSettings,
    params: dict[str, Any],
    *,
    dataset_dir: Path,
    training_dir: Path,
    console: Any,
) -> None:
    """Train, score the exported model and the baseline on the held-out frames, judge, draw."""
    from services.sky_generator.shards import MANIFEST

    rows = [json.loads(line) for line in (dataset_dir / MANIFEST).read_text().splitlines() if line]
    verdicts = [row.get("geometry", {}).get("verdict") for row in rows]
    result.proven, result.unverifiable = verdicts.count("pass"), verdicts.count("unverifiable")
    held = [row for row in rows if row["split"] == "held_out"]
    result.training_frames, result.held_out_frames = len(rows) - len(held), len(held)
    result.epochs = settings.epochs
    console.print(
        f"training sky-position on {result.training_frames} frames ({result.held_out_frames} held out): "
        f"{settings.epochs} epochs, " + ", ".join(f"{k} {v}" for k, v in params.items())
    )
    trained = time.monotonic()
    metrics = train(settings, params, dataset_dir, training_dir, job_id=f"{result.job_id}-position", log=None)
    result.training_seconds = time.monotonic() - trained
    result.trainer_metrics = {k: float(metrics[k]) for k in ("mean_error_km", "median_error_km")}
    model_path = training_dir / "model.onnx"
    result.files["model"] = str(model_path)

    truth = np.array([[row["lat"], row["lon"]] for row in held], np.float64).reshape(-1, 2)
    predicted = predict(
        model_path,
        [dataset_dir / row["file"] for row in held],
        [datetime.fromisoformat(row["time"].replace("Z", "+00:00")) for row in held],
    )
    model_km = haversine_km(truth[:, 0], truth[:, 1], predicted[:, 0], predicted[:, 1])
    centre = region_centre(settings.latitude, settings.longitude)
    base_km = haversine_km(truth[:, 0], truth[:, 1], centre[0], centre[1])
    result.model, result.baseline, result.centre = Errors.of(model_km), Errors.of(base_km), centre
    result.difference_km = paired_interval(model_km - base_km, seed=settings.seed)
    result.better = result.difference_km[1] < 0
    if not result.better and settings.learning_curve:
        result.learning_curve = learning_curve(
            settings,
            params,
            rows,
            dataset_dir,
            training_dir,
            job_id=result.job_id,
            full_km=float(metrics["mean_error_km"]),
        )
        result.estimate = estimate_size(result.learning_curve, result.baseline.mean_km, len(held) / len(rows))
    result.verdict = verdict(result)
    result.files["positions"] = str(
        draw_positions(
            settings.out_dir / "positions.png",
            truth=truth,
            predicted=predicted,
            centre=centre,
            latitude=settings.latitude,
            longitude=settings.longitude,
            title=(
                f"tessera sky demo: {len(held)} held-out frames of {len(rows)}; median error model "
                f"{result.model.median_km:.0f} km ({result.model.median_nm:.0f} nm), centre of region "
                f"{result.baseline.median_km:.0f} km ({result.baseline.median_nm:.0f} nm)"
            ),
        )
    )


def train(
    settings: DemoSettings,
    params: Mapping[str, Any],
    dataset: Path,
    out: Path,
    *,
    job_id: str,
    log: Path | None,
) -> dict[str, Any]:
    """``tessera train sky-position`` on ``dataset`` into ``out`` (a process of its own; its output on the
    console, or in ``log``); the trainer's ``metrics.json``. A failed run raises RuntimeError."""
    command = [
        sys.executable,
        *settings.train_command,
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--epochs",
        str(settings.epochs),
        "--job-id",
        job_id,
    ]
    for name, value in params.items():
        command += ["--param", f"{name}={json.dumps(value)}"]
    # The demo registers nothing: a database the user's shell points at is not the demo's business.
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_DB_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    env["TESSERA_EMF_FILE"] = str(out / "metrics.emf.jsonl")  # the metric lines, off the console
    if log is None:
        finished = subprocess.run(command, env=env, check=False)
    else:
        with log.open("w") as handle:
            finished = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        where = f"; its output is in {log}" if log is not None else " (its output is above)"
        raise RuntimeError(f"training sky-position failed with exit status {finished.returncode}{where}")
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def predict(model: Path, images: Sequence[Path], times: Sequence[datetime]) -> np.ndarray:
    """(lat, lon) degrees ``[N, 2]`` from the exported ONNX model, fed as its metadata says: each picture
    squeezed whole to ``tessera.input_size`` (bilinear), grey or RGB by ``tessera.input_channels``, x/255;
    the time features of :mod:`services.celnav.time_input`."""
    import onnxruntime as ort
    from PIL import Image

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    width, height = (int(v) for v in meta["tessera.input_size"].split("x"))
    channels = int(meta["tessera.input_channels"])
    pixels = []
    for path in images:
        with Image.open(path) as picture:
            squeezed = picture.convert("L" if channels == 1 else "RGB").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        array = np.asarray(squeezed, np.float32) / 255.0
        pixels.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    (latlon,) = session.run(["latlon"], {"image": np.stack(pixels), "time": time_features(times)})
    return np.asarray(latlon, np.float64)


def learning_curve(
    settings: DemoSettings,
    params: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    dataset_dir: Path,
    training_dir: Path,
    *,
    job_id: str,
    full_km: float,
) -> list[dict[str, float]]:
    """The held-out mean error trained on shares of the training frames (a seeded choice; the same recipe,
    seed and held-out frames as the main run, which is the last point). Each share is a dataset of its own
    (a manifest beside a link to the frames) trained by its own ``tessera train`` run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.sky_generator.shards import MANIFEST

    training = [row for row in rows if row["split"] == "train"]
    held = [row for row in rows if row["split"] == "held_out"]
    order = np.random.default_rng(settings.seed).permutation(len(training)).tolist()
    points = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        runs = bar.add_task("learning curve: training runs", total=len(CURVE_FRACTIONS))
        for fraction in CURVE_FRACTIONS:
            count = max(1, round(len(training) * fraction))
            share = training_dir / f"curve-{count}"
            subset = share / "dataset"
            subset.mkdir(parents=True)
            (subset / "frames").symlink_to((dataset_dir / "frames").resolve(), target_is_directory=True)
            chosen = [training[i] for i in sorted(order[:count])]
            (subset / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in chosen + held))
            bar.update(runs, description=f"learning curve: {count} training frames")
            metrics = train(
                settings,
                params,
                subset,
                share / "training",
                job_id=f"{job_id}-curve-{count}",
                log=share / "train.log",
            )
            points.append({"training_frames": count, "mean_km": float(metrics["mean_error_km"])})
            bar.advance(runs)
    points.append({"training_frames": len(training), "mean_km": full_km})
    return points


def paired_interval(differences: np.ndarray, *, seed: int, level: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval of the mean of paired differences (resampling frames)."""
    rng = np.random.default_rng(seed)
    values = np.asarray(differences, np.float64)
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def estimate_size(
    curve: Sequence[Mapping[str, float]], baseline_km: float, val_fraction: float
) -> dict[str, Any]:
    """Fit ``error = c * n ** -b`` through the learning curve and read off the frames (training frames, and
    frames to render with ``val_fraction`` held out) at which it reaches the baseline's mean error and half
    of it. An extrapolation from a few small runs: an order of magnitude at best."""
    n = np.array([p["training_frames"] for p in curve], np.float64)
    err = np.array([p["mean_km"] for p in curve], np.float64)
    fit: dict[str, Any] = {
        "method": "power law error = c * n^-b through the learning curve (an extrapolation)"
    }
    if len(n) < 2 or not np.all(np.isfinite(err)) or np.any(err <= 0):
        return {**fit, "exponent": None, "frames_to_match": None, "frames_to_halve": None}
    slope, intercept = np.polyfit(np.log(n), np.log(err), 1)
    fit["exponent"] = float(-slope)
    if -slope < MIN_EXPONENT:
        return {**fit, "frames_to_match": None, "frames_to_halve": None}

    def frames_for(target_km: float) -> int | None:
        training = math.exp((intercept - math.log(target_km)) / -slope)
        total = training / (1 - val_fraction)
        return None if total > MAX_ESTIMATE else int(_round(total))

    return {**fit, "frames_to_match": frames_for(baseline_km), "frames_to_halve": frames_for(baseline_km / 2)}


def _round(value: float) -> float:
    """Two significant figures."""
    if value <= 0:
        return value
    digits = 1 - math.floor(math.log10(value))
    return round(value, digits)


def verdict(result: DemoResult) -> str:
    """The honest sentence(s): better than the baseline or not, and if not, what size might be."""
    model, base, diff = result.model, result.baseline, result.difference_km
    if model is None or base is None or diff is None:
        return result.verdict
    held = result.held_out_frames
    figures = (
        f"median {model.median_km:.1f} km ({model.median_nm:.1f} nm) against the centre of the region's "
        f"{base.median_km:.1f} km ({base.median_nm:.1f} nm); mean {model.mean_km:.1f} km against "
        f"{base.mean_km:.1f} km"
    )
    interval = (
        f"95% bootstrap interval of the mean difference over {held} held-out frames: "
        f"{diff[0]:+.1f} to {diff[1]:+.1f} km"
    )
    if result.better:
        return f"The model beats the baseline: {figures} ({interval})."
    worse = diff[0] > 0
    text = (
        f"The model is {'worse than' if worse else 'no better than'} the baseline at this size "
        f"({result.frames_done} frames, {result.training_frames} to train on): {figures} ({interval}"
        f"{'' if worse else ', which does not exclude zero'})."
    )
    estimate, curve = result.estimate, result.learning_curve
    if not estimate or not curve:
        return text + " Rerun with a learning curve for an estimate of the size needed."
    points = ", ".join(f"{int(p['training_frames'])} training frames {p['mean_km']:.0f} km" for p in curve)
    if estimate.get("frames_to_match") is None and estimate.get("frames_to_halve") is None:
        reason = (
            "the held-out error did not fall with more training frames"
            if (estimate.get("exponent") or 0.0) < MIN_EXPONENT
            else f"the fitted curve needs more than {MAX_ESTIMATE:,} frames"
        )
        return (
            f"{text} Learning curve ({points}): {reason}, so no size can be read from it; "
            f"the next size to try is ten times this one (--frames {10 * result.frames_done})."
        )
    parts = []
    for key, what in (
        ("frames_to_match", "to match the baseline"),
        ("frames_to_halve", "to halve its error"),
    ):
        value = estimate.get(key)
        if value is None:
            parts.append(f"{what} more than {MAX_ESTIMATE:,} frames")
        elif value <= result.frames_done:
            parts.append(
                f"{what} no more than this run's {result.frames_done} frames by the curve (the gap is noise)"
            )
        else:
            parts.append(f"{what} about {value:,} frames rendered")
    return (
        f"{text} Estimate, extrapolated from a learning curve ({points}; "
        f"error ~ n^-{estimate['exponent']:.2f}) with this recipe, so an order of magnitude at best: "
        f"{'; '.join(parts)}."
    )
