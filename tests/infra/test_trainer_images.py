"""The trainer image per accelerator: each training instance family gets the image whose torch can use its
accelerator (CUDA 13 for Turing and newer, CUDA 12 for Volta, SynapseAI for Gaudi), and the box is told which
accelerator it carries so the trainer refuses a silent CPU run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.trainer_images import (
    ALL_VARIANTS,
    TRAINER,
    VARIANT_IMAGES,
    trainer_variant,
    variants_to_build,
)
from infra.training import FAMILY_ACCELERATORS
from stacks.offline import load_stack_config
from stacks.plan import Plan, plan_stack
from stacks.settings import TRAINER_VARIANTS, ConfigError

IMAGE = "docker:index/image:Image"
DIGEST = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tessera-trainer@sha256:" + "0f" * 32

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


def test_every_variant_has_its_own_dockerfile_and_the_settings_know_them_all() -> None:
    assert TRAINER_VARIANTS == ALL_VARIANTS == tuple(VARIANT_IMAGES)
    assert VARIANT_IMAGES["cuda13"] == TRAINER
    for variant, image in VARIANT_IMAGES.items():
        assert image in (TRAINER, f"{TRAINER}-{variant}")
        assert (ROOT / "images" / f"{image}.Dockerfile").is_file(), image


def _built_trainers(plan: Plan) -> set[str]:
    names = {i.name for i in plan.run.of_type(IMAGE)}
    return {image for image in VARIANT_IMAGES.values() if f"tessera-ecr-{image}-image" in names}


def test_a_stack_with_both_layers_builds_only_its_training_types_trainer(
    shipped_plan: Callable[[str], Plan],
) -> None:
    # dev trains on a p3 (V100): one trainer image, the CUDA 12 one; not the CUDA 13 one, not the Habana one.
    dev = shipped_plan("dev")
    assert _built_trainers(dev) == {"trainer-cuda12"}
    assert set(dev.run.outputs["trainerImageRefs"]) == {"cuda12"}
    assert variants_to_build((), "g5.xlarge") == ("cuda13",)
    assert variants_to_build((), "dl1.24xlarge") == ("gaudi",)


def test_a_data_stack_builds_the_variants_its_setting_names(shipped_plan: Callable[[str], Plan]) -> None:
    prod_data = shipped_plan("prod-data")
    assert load_stack_config(str(ROOT / "Pulumi.prod-data.yaml"))["tessera:trainerVariants"] == ["gaudi"]
    assert _built_trainers(prod_data) == {"trainer-gaudi"}
    assert set(prod_data.run.outputs["trainerImageRefs"]) == {"gaudi"}
    config = load_stack_config(str(ROOT / "Pulumi.prod-data.yaml"))
    config["tessera:trainerVariants"] = ["cuda12", "cuda13"]
    assert _built_trainers(plan_stack("prod-data", ROOT, config=config)) == {"trainer", "trainer-cuda12"}
    # Unset, a data stack cannot know what its compute stacks train on: every variant.
    del config["tessera:trainerVariants"]
    run = plan_stack("prod-data", ROOT, config=config).run
    assert set(run.outputs["trainerImageRefs"]) == set(ALL_VARIANTS)
    assert len(set(run.outputs["trainerImageRefs"].values())) == 3  # three images, not one under three names


@pytest.mark.parametrize("value", [["cuda11"], ["gaudi", "neuron"], [], "rocm"])
def test_an_unknown_trainer_variant_is_refused(value: object) -> None:
    config = load_stack_config(str(ROOT / "Pulumi.prod-data.yaml"))
    config["tessera:trainerVariants"] = value
    with pytest.raises(ConfigError, match=r"tessera:trainerVariants.*cuda13, cuda12, gaudi"):
        plan_stack("prod-data", ROOT, config=config)


def test_a_pinned_variant_counts_as_built() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.prod-data.yaml"))
    config["tessera:imageRefs"] = {"trainer-cuda12": DIGEST}
    run = plan_stack("prod-data", ROOT, config=config).run
    assert run.outputs["trainerImageRefs"] == {
        "cuda12": DIGEST,
        "gaudi": run.outputs["trainerImageRefs"]["gaudi"],
    }
    assert not any("trainer-cuda12" in i.name for i in run.of_type(IMAGE))


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None:
        chain.append(current)
        current = current.__cause__
    return chain


def test_the_compute_layer_refuses_a_training_type_whose_variant_the_data_stack_lacks(
    tmp_path: Path,
) -> None:
    # prod-data builds gaudi only: a prod-compute moved to a p4d (CUDA 13) must not plan.
    for stack in ("prod-data", "prod-compute"):
        (tmp_path / f"Pulumi.{stack}.yaml").write_text((ROOT / f"Pulumi.{stack}.yaml").read_text())
    compute = load_stack_config(str(ROOT / "Pulumi.prod-compute.yaml"))
    compute["tessera:trainingInstanceType"] = "p4d.24xlarge"
    with pytest.raises(ValueError) as raised:
        plan_stack("prod-compute", tmp_path, config=compute)
    # Read across a StackReference, the refusal surfaces through Pulumi's input processing: its cause.
    (refusal,) = [e for e in _causes(raised.value) if isinstance(e, ConfigError)]
    message = str(refusal)
    assert "tessera:trainingInstanceType: 'p4d.24xlarge' needs the 'cuda13' trainer image" in message
    assert "tessera:trainerVariants" in message and "tessera:imageRefs.trainer" in message
    assert "it has: gaudi" in message
    # In one stack the same refusal is a plain ConfigError, raised before anything is declared.
    dev = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    dev["tessera:trainerVariants"] = ["gaudi"]
    with pytest.raises(
        ConfigError, match=r"'cuda12' trainer image.*tessera:trainerVariants.*tessera:imageRefs"
    ):
        plan_stack("dev", ROOT, config=dev)


def test_a_compute_stack_may_not_set_the_data_layers_variants() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.prod-compute.yaml"))
    config["tessera:trainerVariants"] = ["gaudi"]
    with pytest.raises(ConfigError, match=r"tessera:trainerVariants.*set it on the data stack"):
        plan_stack("prod-compute", ROOT, config=config)


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
    assert set(refs) == {variant}  # each shipped data layer builds just the trainer its compute layer runs
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
