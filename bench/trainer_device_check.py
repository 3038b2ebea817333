"""The trainer's device choice on a real NVIDIA GPU: one command, for a machine that has one.

What it shows (issue: training images per accelerator, never a silent CPU run):

- which CUDA architectures the installed torch carries, and whether that build could run a V100 (sm_70)
  — the reason P3 boxes need the CUDA 12 trainer image;
- that ``choose_device("auto")`` finds the box's GPU (by ``TESSERA_ACCELERATOR`` and by ``/dev/nvidia0``)
  and trains on it: a forward and backward pass of the project's detector on the GPU;
- that the same box, with torch pretending the GPU is a V100, refuses to train rather than falling back to
  the CPU, with the message a job would record.

Needs only torch and numpy (it runs from the repository root with ``PYTHONPATH=.``):

    PYTHONPATH=. python3 bench/trainer_device_check.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch

from services.errors import UserError
from services.trainer import device as trainer_device
from services.trainer.detector_net import CenterNetDetector


def _train_step(torch_device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = CenterNetDetector(num_classes=3).to(torch_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(8, 3, 512, 512, device=torch_device)

    def steps(count: int) -> torch.Tensor:
        for _ in range(count):
            loss = torch.stack([t.float().square().mean() for t in _tensors(model(images))]).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    steps(3)  # warm-up: kernel selection, allocator
    started = time.perf_counter()
    timed = 10
    loss = steps(timed)
    seconds = time.perf_counter() - started
    return {
        "weights_on": sorted({p.device.type for p in model.parameters()}),
        "finite_loss": math.isfinite(float(loss.detach())),
        "images_per_s": round(timed * images.shape[0] / seconds, 1),
    }


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    return [v for v in vars(output).values() if isinstance(v, torch.Tensor)]


def main() -> int:
    """Run the checks; print a JSON report and a PASS/FAIL line per check; exit 1 on any FAIL."""
    report: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    checks: list[tuple[str, bool]] = []
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check needs one")
        return 2
    arch_list = torch.cuda.get_arch_list()
    capability = torch.cuda.get_device_capability(0)
    report.update(
        gpu=torch.cuda.get_device_name(0),
        capability=f"sm_{capability[0]}{capability[1]}",
        arch_list=arch_list,
        dev_nvidia0=os.path.exists("/dev/nvidia0"),
    )
    volta_ok = trainer_device._arch_supported((7, 0), arch_list)
    report["this_torch_runs_a_v100"] = volta_ok
    checks.append(("this GPU's architecture is in torch's kernels", trainer_device.cuda_problem() is None))

    found = trainer_device.box_accelerator({})
    report["box_accelerator_by_device_file"] = found
    checks.append(("the GPU is found by its device file", found is not None and found[0] == "nvidia"))

    for env in ({"TESSERA_ACCELERATOR": "nvidia"}, {}):
        chosen = trainer_device.choose_device("auto", env=env)
        checks.append((f"auto picks cuda with env {env}", chosen.kind == "cuda"))
    step = _train_step(chosen.torch_device)
    report["train_step"] = step
    checks.append(("a detector training step runs on the GPU", step["weights_on"] == ["cuda"]))
    checks.append(("its loss is finite", step["finite_loss"]))

    real_capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda index=0: (7, 0)  # type: ignore[assignment]
    try:
        trainer_device.choose_device("auto", env={"TESSERA_ACCELERATOR": "nvidia"})
        refusal = None
    except UserError as exc:
        refusal = str(exc)
    finally:
        torch.cuda.get_device_capability = real_capability
    report["v100_refusal"] = refusal
    checks.append(
        (
            "posing as a V100 under this torch: refused, not a CPU run",
            (refusal is not None) == (not volta_ok),
        )
    )

    print(json.dumps(report, indent=2, default=str))
    failed = 0
    for name, ok in checks:
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
