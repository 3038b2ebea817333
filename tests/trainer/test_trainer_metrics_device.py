"""EMF lines carry the names the Grafana training dashboard searches for; the CPU device and sharding."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from services.trainer.device import Device, choose_device, shard
from services.trainer.metrics import TrainingMetrics, loss_metric_name

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "dashboards" / "training.json"


def test_emf_names_match_the_dashboard_searches() -> None:
    stream = io.StringIO()
    TrainingMetrics("dcgan", stack="dev", stream=stream).record(
        {"loss_d": 0.7, "loss_g": 1.2}, images_per_second=321.0, epoch=3
    )
    record = json.loads(stream.getvalue())
    spec = record["_aws"]["CloudWatchMetrics"][0]
    assert spec["Namespace"] == "tessera" and spec["Dimensions"] == [["Service", "Task", "Stack"]]
    assert (record["Service"], record["Task"], record["Stack"]) == ("trainer", "dcgan", "dev")
    names = [m["Name"] for m in spec["Metrics"]]
    assert record["images_per_second"] == 321.0
    searches = re.findall(
        r"SEARCH\('Namespace=\\\"tessera\\\" ([^']+)'", json.dumps(json.load(DASHBOARD.open()))
    )
    loss_terms, throughput_terms = searches[0].split(), re.findall(r"\w+", searches[1])
    tokens = {n: set(n.split("_")) for n in names}
    assert all(loss_terms[0] in tokens[n] for n in ("loss_d", "loss_g"))
    assert set(throughput_terms) & tokens["images_per_second"]
    assert loss_metric_name("heat") == "loss_heat" and loss_metric_name("loss") == "loss"


def test_cpu_device_and_sharding() -> None:
    device = choose_device("cpu", env={})
    assert (device.kind, device.rank, device.world_size, device.is_main) == ("cpu", 0, 1, True)
    assert choose_device("auto", env={}).kind in {"cpu", "cuda"}
    batches = list(range(7))
    assert list(shard(batches, device)) == batches
    ranks = [Device("cpu", torch.device("cpu"), rank=r, world_size=3) for r in range(3)]
    assert [list(shard(batches, d)) for d in ranks] == [[0, 3], [1, 4], [2, 5]]  # the last 6 is dropped
