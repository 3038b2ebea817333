"""The trainer image per accelerator: each training instance family gets the image whose torch can use its
accelerator (CUDA 13 for Turing and newer, CUDA 12 for Volta, SynapseAI for Gaudi), and the box is told which
accelerator it carries so the trainer refuses a silent CPU run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.trainer_images import BUILT_VARIANTS, TRAINER, VARIANT_IMAGES, trainer_variant
from infra.training import FAMILY_ACCELERATORS
from stacks.offline import load_stack_config
from stacks.plan import Plan, plan_stack
from stacks.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMETER = "aws:ssm/parameter:Parameter"


@pytest.mark.parametrize(
    ("instance_type", "variant"),
    [
        ("p3.2xlarge", "cuda12"),
        ("p3dn.24xlarge", "cuda12"),
        ("g4dn.xlarge", "cuda13"),
        ("g5.2xlarge", "cuda13"),
        ("p4d.24xlarge", "cuda13"),
        ("p5.48xlarge", "cuda13"),
        ("dl1.24xlarge", "gaudi"),
    ],
)
def test_each_family_gets_the_image_its_accelerator_needs(instance_type: str, variant: str) -> None:
    assert trainer_variant(instance_type) == variant


def test_every_trainable_family_has_an_image_or_a_clear_refusal() -> None:
    for family, accelerator in FAMILY_ACCELERATORS.items():
        if accelerator == "neuron":
            with pytest.raises(
                ValueError, match=r"tessera:trainingInstanceType: .*Neuron.*no Neuron trainer"
            ):
                trainer_variant(f"{family}.2xlarge")
        else:
            assert trainer_variant(f"{family}.2xlarge") in VARIANT_IMAGES


def test_the_registry_builds_every_variant_with_its_own_dockerfile() -> None:
    built = {VARIANT_IMAGES["cuda13"]} | {f"{TRAINER}-{v}" for v in BUILT_VARIANTS[TRAINER]}
    assert built == set(VARIANT_IMAGES.values())
    for image in built:
        assert (ROOT / "images" / f"{image}.Dockerfile").is_file(), image


def _trainer_config(plan: Plan) -> dict[str, Any]:
    (parameter,) = [p for p in plan.run.of_type(PARAMETER) if "training" in p.name]
    raw = parameter.inputs["value"]
    value = json.loads(raw["value"] if isinstance(raw, dict) else raw)  # a secret arrives wrapped
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("stack", "variant", "accelerator"), [("dev", "cuda12", "nvidia"), ("prod-compute", "gaudi", "gaudi")]
)
def test_the_training_box_runs_its_variant_and_knows_its_accelerator(
    stack: str, variant: str, accelerator: str, shipped_plan: Callable[[str], Plan]
) -> None:
    plan = shipped_plan(stack)
    data_outputs = plan.run.outputs if stack == "dev" else shipped_plan("prod-data").run.outputs
    refs = data_outputs["trainerImageRefs"]
    assert set(refs) == {"cuda13", "cuda12", "gaudi"}
    assert len(set(refs.values())) == 3  # three images, not one under three names
    config = _trainer_config(plan)
    # dev trains on a p3 (V100): the CUDA 12 image; prod on a DL1: the SynapseAI one.
    assert config["image"] == refs[variant]
    assert config["environment"]["TESSERA_ACCELERATOR"] == accelerator
    assert config["environment"]["TESSERA_SERVICE"] == TRAINER  # the service's environment is still there


def test_a_neuron_training_instance_is_refused_when_planned() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    config["tessera:trainingInstanceType"] = "trn1.2xlarge"
    refusal = r"tessera:trainingInstanceType: 'trn1\.2xlarge'.*no Neuron trainer"
    with pytest.raises(ConfigError, match=refusal):
        plan_stack("dev", ROOT, config=config)
