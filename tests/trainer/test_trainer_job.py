"""The training job schema: defaults, and every problem listed with its JSON path."""

from __future__ import annotations

import pytest

from services.errors import UserError
from services.trainer.job import SCHEMA, parse_job


def test_a_job_round_trips_with_defaults() -> None:
    job = parse_job(
        '{"task": "detector", "dataset": "s3://data/ships/", "output": "s3://models/ships", "steps": 5,'
        ' "register": {"name": "ships"}}'
    )
    assert (job.task, job.steps, job.epochs, job.register_name, job.device) == (
        "detector",
        5,
        None,
        "ships",
        "auto",
    )
    assert parse_job(job.to_json()) == job
    assert job.to_json()["schema"] == SCHEMA


def test_every_problem_is_listed_with_its_path() -> None:
    with pytest.raises(UserError) as caught:
        parse_job(
            {
                "schema": "tessera.training-job/v9",
                "job_id": "no spaces",
                "dataset": "http://x/y",
                "output": 3,
                "steps": 0,
                "epochs": 2,
                "checkpoint_every": "often",
                "register": {"name": "", "tag": 1},
                "params": [],
                "colour": "red",
            }
        )
    message = str(caught.value)
    for path in (
        "$.schema",
        "$.job_id",
        "$.task: required",
        "$.dataset",
        "$.output",
        "$.steps: give epochs or steps, not both",
        "$.steps: must be a whole number",
        "$.checkpoint_every",
        "$.register.name",
        "$.register.tag",
        "$.params",
        "$.colour: unknown field",
    ):
        assert path in message
    with pytest.raises(UserError, match="not JSON"):
        parse_job("{")


def test_train_submit_to_a_bad_bucket_says_the_bucket_is_the_problem() -> None:
    with pytest.raises(UserError, match=r"\$\.output: 's3://x/y': the bucket name 'x' is not a valid"):
        parse_job({"task": "detector", "dataset": "synthetic", "output": "s3://x/y", "steps": 1})
