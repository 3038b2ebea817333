"""The detector task through the loop: a directory of labelled scenes and the synthetic dataset, resume
with the same trajectory, ONNX export checked against torch, stored on S3 and registered in PostgreSQL,
and the registered name resolved the way the model runner will."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from services.cloud.database import apply_migrations, connect
from services.cloud.embedded import Resources
from services.cloud.objects import read_object, s3_client, write_object
from services.errors import UserError
from services.registry import resolve, resolve_model_uri
from services.scenes.synthetic import DEFAULT_CLASSES, generate_scene
from services.trainer.device import Device
from services.trainer.job import parse_job
from services.trainer.loop import run
from services.trainer.storage import LocalStorage, S3Storage
from services.trainer.tasks import make_task

CPU = Device("cpu", torch.device("cpu"))
TINY = {"batch_size": 2, "crop": 32, "width": 8, "tile": 64, "eval_scenes": 2, "steps_per_epoch": 3}


class CrashError(RuntimeError):
    pass


def make_scenes(directory: Path, count: int = 4, size: int = 64) -> Path:
    """Labelled scenes in the detector task's layout: classes.json, NAME.png + NAME.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "classes.json").write_text(json.dumps(list(DEFAULT_CLASSES)))
    for i in range(count):
        pixels, boxes, labels = generate_scene(size, size, seed=100 + i, density=2000.0)
        Image.fromarray(pixels.transpose(1, 2, 0)).save(directory / f"scene{i}.png")
        names = [DEFAULT_CLASSES[int(k)] for k in labels]
        (directory / f"scene{i}.json").write_text(json.dumps({"boxes": boxes.tolist(), "labels": names}))
    return directory


def _job(dataset: str, out: str, **extra: object):  # type: ignore[no-untyped-def]
    return parse_job({"task": "detector", "dataset": dataset, "output": out, "params": TINY, **extra})


def test_labelled_scenes_train_resume_export_register_resolve(
    tmp_path: Path, resources: Resources, database_url: str
) -> None:
    scenes = make_scenes(tmp_path / "scenes")
    s3 = s3_client()
    for path in scenes.iterdir():
        write_object(f"s3://{resources.buckets['datasets']}/ships/{path.name}", path.read_bytes(), client=s3)
    dataset = f"s3://{resources.buckets['datasets']}/ships/"
    whole = run(
        make_task("detector"),
        _job(dataset, str(tmp_path / "whole"), steps=4),
        CPU,
        LocalStorage(tmp_path / "whole"),
    )

    out = f"s3://{resources.buckets['models']}/detector/run-1"
    job = _job(dataset, out, steps=4, checkpoint_every=2, job_id="ships-1", register={"name": "ships"})

    def crash(step: int, losses: object) -> None:
        if step == 3:
            raise CrashError

    with connect(database_url) as conn:
        apply_migrations(conn)
        with pytest.raises(CrashError):
            run(make_task("detector"), job, CPU, S3Storage(out), conn=conn, on_step=crash)
        result = run(make_task("detector"), job, CPU, S3Storage(out), conn=conn)
        assert result.resumed_from_step == 2
        np.testing.assert_allclose(
            [h["loss"] for h in result.history], [h["loss"] for h in whole.history], rtol=0, atol=1e-6
        )
        assert result.model_uri == f"{out}/model.onnx"
        model = onnx.load_from_string(read_object(result.model_uri, s3))
        assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["tessera.class_names"]) == list(DEFAULT_CLASSES)
        assert result.metrics["onnx_max_abs_diff"] <= 1e-4
        for name in ("loss.png", "metrics.json", "job.json", "pictures/detections.png"):
            assert read_object(f"{out}/{name}", s3)
        assert any(k.startswith("tensorboard:") for k in result.artifacts)
        assert result.registered is not None and result.registered.ref == "ships:1"
        # What the model runner does with {"model": "ships"}:
        assert resolve_model_uri(conn, "ships") == result.model_uri
        assert resolve(conn, "ships:1").metrics["steps"] == 4
        with pytest.raises(UserError, match="no model named 'boats'"):
            resolve_model_uri(conn, "boats")


def test_synthetic_scenes_train_and_export(tmp_path: Path) -> None:
    result = run(
        make_task("detector"),
        _job("synthetic", str(tmp_path / "out"), epochs=1),
        CPU,
        LocalStorage(tmp_path / "out"),
    )
    assert (result.steps, result.epochs) == (3, 1)
    assert (tmp_path / "out" / "model.onnx").is_file()
    m = result.metrics
    assert {"true_positives", "false_positives", "false_negatives"} <= set(m)
    # Rates only where defined (3 steps may detect nothing: precision is then absent, not 1.0).
    assert ("precision" in m) == (m["true_positives"] + m["false_positives"] > 0)
    assert ("recall" in m) == (m["true_positives"] + m["false_negatives"] > 0)
    assert Image.open(tmp_path / "out" / "loss.png").size == (900, 500)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"params": {**TINY, "crop": 30}},
            r"\$\.params\.crop: must be a whole number >= 16, a multiple of 16",
        ),
        ({"params": {**TINY, "learning_rte": 0.1}}, r"\$\.params\.learning_rte: unknown hyper-parameter"),
        ({"dataset": "/nowhere/at/all"}, "does not exist"),
    ],
)
def test_bad_jobs_fail_before_training(tmp_path: Path, change: dict, message: str) -> None:
    body = {"task": "detector", "dataset": "synthetic", "output": str(tmp_path), "steps": 1, "params": TINY}
    with pytest.raises(UserError, match=message):
        run(make_task("detector"), parse_job({**body, **change}), CPU, LocalStorage(tmp_path))


def test_dataset_layout_problems_are_named(tmp_path: Path) -> None:
    task = make_task("detector")
    params = task.params(TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no classes\.json"):
        task.load(tmp_path / "empty", params)
    (tmp_path / "empty" / "classes.json").write_text('["ship"]')
    with pytest.raises(UserError, match=r"holds no scenes \(\*\.png\)"):
        task.load(tmp_path / "empty", params)
    scenes = make_scenes(tmp_path / "one", count=1)
    with pytest.raises(UserError, match="fewer than one batch"):
        task.load(scenes, params)
    (scenes / "scene0.json").unlink()
    with pytest.raises(UserError, match=r"has no scene0\.json"):
        task.load(scenes, params)
