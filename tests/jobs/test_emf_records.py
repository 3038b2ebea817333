"""EMF records: the shape CloudWatch's agent turns into metrics, one line each, whole under threads."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from services.jobs.emf import NAMESPACE, EmfWriter, emf_record
from services.model_runner.metrics import Metrics
from services.trainer.metrics import TrainingMetrics


def test_a_record_declares_its_metrics_under_its_dimension_set() -> None:
    record = emf_record(
        {"Service": "svc", "Stack": "dev"},
        {"Rate": 2, "Count": 3.5},
        lambda name: "Count/Second" if name == "Rate" else "Count",
        {"Worker": "w1"},
    )
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    assert directive == {
        "Namespace": NAMESPACE,
        "Dimensions": [["Service", "Stack"]],
        "Metrics": [{"Name": "Rate", "Unit": "Count/Second"}, {"Name": "Count", "Unit": "Count"}],
    }
    assert record["Service"] == "svc" and record["Stack"] == "dev" and record["Worker"] == "w1"
    assert record["Rate"] == 2.0 and isinstance(record["Rate"], float) and record["Count"] == 3.5
    assert isinstance(record["_aws"]["Timestamp"], int)


def test_lines_stay_whole_when_threads_write_at_once() -> None:
    stream = io.StringIO()
    writer = EmfWriter(stream)

    def write(n: int) -> None:
        for i in range(200):
            writer.write(emf_record({"Service": "s"}, {"Value": n * 1000 + i}, lambda _: "None"))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = sorted(json.loads(line)["Value"] for line in stream.getvalue().splitlines())
    assert values == sorted(float(n * 1000 + i) for n in range(4) for i in range(200))


def test_both_services_write_through_it_with_their_own_dimensions() -> None:
    runner_out, trainer_out = io.StringIO(), io.StringIO()
    Metrics(service="model-runner", stack="dev", stream=runner_out).record({"TilesPerSecond": 9.5})
    TrainingMetrics("detector", stack="dev", stream=trainer_out).record({"heat": 0.5}, epoch=2)
    runner = json.loads(runner_out.getvalue())
    trainer = json.loads(trainer_out.getvalue())
    assert runner["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Service", "Stack"]]
    assert runner["_aws"]["CloudWatchMetrics"][0]["Metrics"] == [
        {"Name": "TilesPerSecond", "Unit": "Count/Second"}
    ]
    assert trainer["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Service", "Task", "Stack"]]
    assert (trainer["Service"], trainer["Task"], trainer["loss_heat"], trainer["epoch"]) == (
        "trainer",
        "detector",
        0.5,
        2.0,
    )


def test_tessera_emf_file_takes_the_lines_off_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "metrics.emf.jsonl"
    monkeypatch.setenv("TESSERA_EMF_FILE", str(target))
    writer = EmfWriter()
    for value in (1.0, 2.0):
        writer.write(emf_record({"Service": "trainer"}, {"loss": value}, lambda _: "None"))
    assert capsys.readouterr().out == ""
    assert [json.loads(line)["loss"] for line in target.read_text().splitlines()] == [1.0, 2.0]
    monkeypatch.delenv("TESSERA_EMF_FILE")
    writer.write(emf_record({"Service": "trainer"}, {"loss": 3.0}, lambda _: "None"))
    assert json.loads(capsys.readouterr().out)["loss"] == 3.0
