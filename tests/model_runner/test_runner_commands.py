"""``tessera submit`` and ``tessera worker model-runner`` (``--once``, ``--max-messages``), on moto and
PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from runner_harness import job_status, read_geojson, upload_scene
from square_world import feature_boxes, square_boxes

from services.cloud.embedded import Resources
from services.model_runner.commands import main as commands_main
from services.model_runner.request import parse_request


@pytest.mark.usefixtures("runner_env")
def test_submit_then_serve_with_the_worker_command(
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scene = upload_scene(resources, tmp_path, square_model)
    code = commands_main(
        [
            "submit",
            scene.image_url,
            "--model",
            scene.model_url,
            "--out",
            scene.results_prefix,
            "--overlap",
            "16",
            "--region",
            "96",
            "--score",
            "0.5",
            "--property",
            "mission=alpha",
            "--job-id",
            "cli-job",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == "cli-job"

    # One message: the image request. It plans 12 regions and queues them.
    assert commands_main(["worker", "model-runner", "--once", "--wait", "0"]) == 0
    job = job_status(database_url, "cli-job")
    assert job is not None and (job.status, job.regions_total) == ("IN_PROGRESS", 12)
    request = parse_request(job.request or {})
    assert request.merge.score_threshold == 0.5
    assert request.properties == {"mission": "alpha"}
    assert request.outputs.s3 == scene.results_prefix

    # The twelve region messages, then the worker exits by itself.
    assert commands_main(["worker", "model-runner", "--max-messages", "12", "--wait", "1"]) == 0
    job = job_status(database_url, "cli-job")
    assert job is not None and job.status == "SUCCESS", job
    assert feature_boxes(read_geojson(job.output_uris[0])) == square_boxes(scene.squares)
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sum(1 for m in metrics if "TilesPerSecond" in m) == 12


def test_submit_refuses_a_bad_request_before_sending(
    resources: Resources, runner_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = commands_main(
        ["submit", "a.tif", "--model", "ships model", "--out", "s3://results/x", "--batch", "0"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "$.model:" in err and "registry name" in err and "$.batch_size:" in err
    sqs = boto3.client("sqs")
    assert "Messages" not in sqs.receive_message(QueueUrl=runner_env["TESSERA_QUEUE_IMAGE_REQUESTS_URL"])
    assert resources.queue_urls["image-requests"] == runner_env["TESSERA_QUEUE_IMAGE_REQUESTS_URL"]


def test_submit_needs_a_queue(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TESSERA_QUEUE_IMAGE_REQUESTS_URL", raising=False)
    assert commands_main(["submit", "a.tif", "--model", "m.onnx", "--out", "s3://results/x"]) == 2
    assert "--queue-url" in capsys.readouterr().err
