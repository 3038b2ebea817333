"""The trainer never trains on the CPU beside an accelerator it cannot use: a P3 whose torch lacks sm_70, a
DL1 whose image has no Habana bridge, a Neuron box. torch.cuda, the environment and the device files are
stand-ins here (no accelerator on this machine); the refused job fails with its reason, the worker goes on."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from services.cloud.database import connect
from services.cloud.embedded import Resources
from services.cloud.queue import send_message
from services.errors import UserError
from services.trainer import device as device_module
from services.trainer.device import DeviceFile, choose_device, local_device_count
from services.trainer.worker import Worker, WorkerSettings

CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
TINY = {"batch_size": 2, "crop": 32, "width": 8, "tile": 64, "eval_scenes": 1, "steps_per_epoch": 2}


def _gpus(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str, count: int = 1) -> None:
    """torch sees ``count`` GPUs of ``capability`` and holds CUDA 13 kernels (PyPI's torch 2.13)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CUDA13_ARCHS))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)


def _device_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **present: str) -> None:
    """Device files under tmp_path: ``hl0="gaudi"`` makes a /dev/hl0 stand-in."""
    files = []
    for name, accelerator in present.items():
        path = tmp_path / name
        path.write_text("")
        files.append(DeviceFile(str(path), accelerator))
    monkeypatch.setattr(device_module, "DEVICE_FILES", tuple(files))


@pytest.fixture(autouse=True)
def _no_real_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "DEVICE_FILES", ())
    monkeypatch.delenv("TESSERA_ACCELERATOR", raising=False)


def test_an_nvidia_box_whose_torch_sees_no_cuda_refuses_the_cpu() -> None:
    env = {"TESSERA_ACCELERATOR": "nvidia"}
    with pytest.raises(UserError) as refused:
        choose_device("auto", env=env)
    message = str(refused.value)
    assert "NVIDIA GPU (TESSERA_ACCELERATOR=nvidia)" in message
    assert f"torch {torch.__version__}" in message and "is_available() is False" in message
    assert "trainer-cuda12.Dockerfile" in message and "refusing to train on the CPU" in message
    with pytest.raises(UserError, match="NVIDIA GPU"):
        local_device_count("auto", env=env)


def test_a_v100_under_a_cuda_13_torch_is_refused_with_the_volta_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PyPI's torch 2.13 on a p3: CUDA works, but there is no sm_70 kernel; every op would fail mid-job.
    _gpus(monkeypatch, (7, 0), "Tesla V100-SXM2-16GB", count=8)
    for prefer in ("auto", "cuda"):
        with pytest.raises(UserError) as refused:
            choose_device(prefer, env={"TESSERA_ACCELERATOR": "nvidia"})
        message = str(refused.value)
        assert "sm_70" in message and "Tesla V100" in message and "sm_75" in message
        assert "trainer-cuda12.Dockerfile" in message and "Volta" in message
    with pytest.raises(UserError, match="sm_70"):
        local_device_count("auto", env={"TESSERA_ACCELERATOR": "nvidia"})


@pytest.mark.parametrize(("capability", "name"), [((7, 5), "Tesla T4"), ((8, 6), "NVIDIA A10G")])
def test_gpus_the_torch_build_covers_train_on_cuda(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str
) -> None:
    _gpus(monkeypatch, capability, name, count=4)
    env = {"TESSERA_ACCELERATOR": "nvidia"}
    assert choose_device("auto", env=env).kind == "cuda"
    assert local_device_count("auto", env=env) == 4


def test_a_gaudi_box_without_the_habana_bridge_refuses_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No TESSERA_ACCELERATOR: the device file alone (what --runtime=habana mounts) says there is a Gaudi.
    _device_files(monkeypatch, tmp_path, hl0="gaudi")
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)  # not importable, as in a CUDA image
    with pytest.raises(UserError) as refused:
        choose_device("auto", env={})
    message = str(refused.value)
    assert f"Habana Gaudi card ({tmp_path / 'hl0'})" in message
    assert "no Habana bridge (import habana_frameworks.torch" in message
    assert "trainer-gaudi.Dockerfile" in message and "--runtime=habana" in message
    # Asking for the CPU on purpose still works.
    assert choose_device("cpu", env={}).kind == "cpu"


def test_a_gaudi_box_with_the_bridge_trains_on_every_card(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge = types.ModuleType("habana_frameworks.torch")
    package = types.ModuleType("habana_frameworks")
    package.torch = bridge  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "habana_frameworks", package)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", bridge)
    hpu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8)
    monkeypatch.setattr(torch, "hpu", hpu, raising=False)
    assert local_device_count("auto", env={"TESSERA_ACCELERATOR": "gaudi"}) == 8


def test_a_neuron_box_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _device_files(monkeypatch, tmp_path, neuron0="neuron")
    with pytest.raises(UserError, match=r"AWS Neuron device .*neuron0.*tessera:trainingInstanceType"):
        choose_device("auto", env={})


def test_another_vendors_accel_device_is_not_taken_for_a_gaudi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # /dev/accel/accel0 is also an Intel NPU's: only a habanalabs driver behind it means Gaudi.
    accel = tmp_path / "accel0"
    accel.write_text("")
    drivers = tmp_path / "drivers"
    (drivers / "intel_vpu").mkdir(parents=True)
    link = tmp_path / "driver"
    link.symlink_to(drivers / "intel_vpu")
    monkeypatch.setattr(
        device_module, "DEVICE_FILES", (DeviceFile(str(accel), "gaudi", str(link), "habanalabs"),)
    )
    assert choose_device("auto", env={}).kind == "cpu"
    (drivers / "habanalabs").mkdir()
    link.unlink()
    link.symlink_to(drivers / "habanalabs")
    with pytest.raises(UserError, match="Habana Gaudi card"):
        choose_device("auto", env={})


def test_a_box_without_accelerators_trains_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert choose_device("auto", env={}).kind == "cpu"
    # The stack's word wins over a stray device file.
    _device_files(monkeypatch, tmp_path, nvidia0="nvidia")
    assert choose_device("auto", env={"TESSERA_ACCELERATOR": "none"}).kind == "cpu"
    with pytest.raises(UserError, match="TESSERA_ACCELERATOR='tpu' is not one of nvidia, gaudi, neuron"):
        choose_device("auto", env={"TESSERA_ACCELERATOR": "tpu"})


def test_the_refused_job_fails_with_the_reason_and_the_worker_goes_on(
    tmp_path: Path,
    resources: Resources,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import boto3

    queue = boto3.client("sqs").create_queue(
        QueueName=f"training-refusal-{id(tmp_path)}", Attributes={"VisibilityTimeout": "30"}
    )["QueueUrl"]
    # A DL1 running the CUDA image: the stack says gaudi, and this torch has no Habana bridge.
    monkeypatch.setenv("TESSERA_ACCELERATOR", "gaudi")
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
    base = {"task": "detector", "dataset": "synthetic", "steps": 2, "params": TINY}
    send_message(queue, {**base, "job_id": "on-the-cpu-by-accident", "output": str(tmp_path / "a")})
    send_message(
        queue, {**base, "job_id": "on-the-cpu-on-purpose", "device": "cpu", "output": str(tmp_path / "b")}
    )
    worker = Worker(
        WorkerSettings(
            queue_url=queue, database_url=database_url, wait_s=0, state_path=str(tmp_path / "state.json")
        )
    )
    caplog.set_level(logging.INFO, logger="services.trainer")
    try:
        handled = 0
        while worker.poll(wait_s=0):
            handled += 1
    finally:
        worker.close()
    assert handled == 2
    with connect(database_url) as conn:
        rows = dict(
            conn.execute(
                "SELECT id, (status, reason) FROM training_jobs WHERE id LIKE 'on-the-cpu-%'"
            ).fetchall()
        )
    status, reason = rows["on-the-cpu-by-accident"]
    assert status == "FAILED"
    assert "Habana Gaudi card (TESSERA_ACCELERATOR=gaudi)" in reason and "trainer-gaudi" in reason
    assert rows["on-the-cpu-on-purpose"][0] == "SUCCESS"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "on-the-cpu-by-accident failed: this box has a Habana Gaudi card" in logged
