"""The service Dockerfiles, read statically (no Docker engine here): pinned bases, CUDA where the service
needs a GPU, a non-root user, no baked-in secrets, the tessera CLI as entrypoint, only build inputs copied,
dependencies installed from a hashed lock. The trainer has one image per accelerator."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.registry import (
    IGNORED_DIRS,
    IGNORED_SUFFIXES,
    RegistryArgs,
    content_tag,
    copied_sources,
    dockerfile_instructions,
    dockerignore_path,
)
from infra.trainer_images import ALL_VARIANTS, TRAINER, VARIANT_IMAGES, registry_variants
from stacks.services import DATABASE_BOOTSTRAP, SERVICE_NAMES, SERVICES

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
GPU_SERVICES = sorted(s.name for s in SERVICES if s.gpu)
CPU_SERVICES = sorted(s.name for s in SERVICES if not s.gpu)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|AWS_ACCESS_KEY|AWS_SECRET|API_KEY|PRIVATE_KEY", re.I)
EXPECTED_CMD = {"sight-catalog": ["sights", "serve", "--host", "0.0.0.0", "--port", "8080"]}
VARIANTS = {image: TRAINER for image in VARIANT_IMAGES.values() if image != TRAINER}
#: Every image run by the tessera CLI: the services' and their variants' (the trainer per accelerator).
IMAGE_NAMES = [*SERVICE_NAMES, *VARIANTS]
#: The lock each image installs (images/locks/, made by images/lock.sh).
EXPECTED_LOCK = {
    **{name: "services.txt" for name in SERVICE_NAMES},
    "trainer": "trainer-cuda13.txt",
    "trainer-cuda12": "trainer-cuda12.txt",
    "trainer-gaudi": "trainer-gaudi.txt",
}
CUDA_IMAGES = sorted({*GPU_SERVICES, *(i for i in VARIANTS if i != VARIANT_IMAGES["gaudi"])})


def service_of(image: str) -> str:
    """The service an image runs (a variant runs its service's command)."""
    return VARIANTS.get(image, image)


@dataclass
class Stage:
    """One build stage: its base image, its alias and its instructions after FROM."""

    base: str
    alias: str | None
    instructions: list[tuple[str, str]]

    def args(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]


def stages(service: str) -> list[Stage]:
    text = (IMAGES / f"{service}.Dockerfile").read_text(encoding="utf-8")
    found: list[Stage] = []
    for name, rest in dockerfile_instructions(text):
        if name == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(words[0], alias, []))
        elif found:
            found[-1].instructions.append((name, rest))
    assert found, f"{service}: no FROM"
    return found


def final(service: str) -> Stage:
    return stages(service)[-1]


def assignments(rest: str) -> dict[str, str]:
    """KEY=value pairs of an ENV, ARG or LABEL instruction (also the legacy ``ENV KEY value`` form)."""
    words = shlex.split(rest)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs = [w.partition("=") for w in words]
    return {key: value for key, _, value in pairs}


def test_every_service_has_exactly_one_dockerfile() -> None:
    present = {p.name.removesuffix(".Dockerfile") for p in IMAGES.glob("*.Dockerfile")}
    # The database bootstrap is a Lambda image (not the tessera CLI): its own rules live with it.
    assert present == {*IMAGE_NAMES, DATABASE_BOOTSTRAP}
    # The registry accepts the real tree: every image it builds finds its Dockerfile.
    RegistryArgs(services=SERVICE_NAMES, context_dir=str(ROOT), variants=registry_variants(ALL_VARIANTS)[0])


@pytest.mark.parametrize("service", [*IMAGE_NAMES, DATABASE_BOOTSTRAP])
def test_every_base_image_is_pinned(service: str) -> None:
    aliases: set[str] = set()
    for stage in stages(service):
        if stage.base not in aliases:
            image = stage.base.split("@", 1)[0]
            name, _, tag = image.rpartition("/")[2].partition(":")
            assert name and tag, f"{service}: base {stage.base!r} has no tag"
            assert tag != "latest", f"{service}: base {stage.base!r} floats"
            assert "$" not in stage.base, f"{service}: base {stage.base!r} is chosen at build time"
        if stage.alias:
            aliases.add(stage.alias)
    for rest in [r for s in stages(service) for r in s.args("COPY") if r.startswith("--from=")]:
        source = rest.split()[0].removeprefix("--from=")
        assert source in aliases or (":" in source and not source.endswith(":latest")), rest


@pytest.mark.parametrize("service", CUDA_IMAGES)
def test_gpu_services_run_on_a_cuda_runtime(service: str) -> None:
    assert re.fullmatch(r"nvidia/cuda:1[23]\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", final(service).base)


def test_each_trainer_runs_on_the_cuda_its_torch_needs() -> None:
    # PyPI's torch 2.13 is CUDA 13 (Turing and newer); the Volta image's torch 2.10 is CUDA 12.8.
    assert final(VARIANT_IMAGES["cuda13"]).base.startswith("nvidia/cuda:13.")
    assert final(VARIANT_IMAGES["cuda12"]).base.startswith("nvidia/cuda:12.")


def test_the_gaudi_trainer_starts_from_a_synapseai_release_that_supports_gaudi_1() -> None:
    # SynapseAI 1.21 is the last release for first-generation Gaudi (DL1); its torch carries the bridge.
    base = final(VARIANT_IMAGES["gaudi"]).base
    found = re.fullmatch(
        r"vault\.habana\.ai/gaudi-docker/(1\.21\.\d+)/ubuntu24\.04/habanalabs/pytorch-installer-[\d.]+:([\d.]+)-\d+",
        base,
    )
    assert found is not None, base
    assert found.group(1) == found.group(2)  # the tag names the same release as the path
    runs = " ".join(final(VARIANT_IMAGES["gaudi"]).args("RUN"))
    assert "--system-site-packages" in runs  # the venv sees the image's torch and habana_frameworks


@pytest.mark.parametrize("service", CPU_SERVICES)
def test_cpu_services_run_on_slim_python_311(service: str) -> None:
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final(service).base)


@pytest.mark.parametrize("service", IMAGE_NAMES)
def test_the_container_runs_as_a_numeric_non_root_user(service: str) -> None:
    names = [name for name, _ in final(service).instructions]
    assert "USER" in names and "ENTRYPOINT" in names
    users = final(service).args("USER")
    assert names.index("USER") < names.index("ENTRYPOINT")
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{service}: USER {users[-1]!r}"
    # Nothing after the user switch goes back to root.
    assert all(u.split(":")[0] not in ("0", "root") for u in users)


@pytest.mark.parametrize("service", [*IMAGE_NAMES, DATABASE_BOOTSTRAP])
def test_no_secrets_are_baked_in(service: str) -> None:
    for stage in stages(service):
        for name in ("ENV", "ARG"):
            for rest in stage.args(name):
                for key, value in assignments(rest).items():
                    assert not SECRET_NAME.search(key), f"{service}: {name} {key}"
                    assert not re.search(r"AKIA[0-9A-Z]{16}", value), (
                        f"{service}: {name} {key} holds a key id"
                    )


@pytest.mark.parametrize("service", IMAGE_NAMES)
def test_entrypoint_is_the_tessera_cli(service: str) -> None:
    stage = final(service)
    assert [json.loads(e) for e in stage.args("ENTRYPOINT")] == [["tessera"]]
    command = EXPECTED_CMD.get(service_of(service), ["worker", service_of(service)])
    assert [json.loads(c) for c in stage.args("CMD")] == [command]


@pytest.mark.parametrize("service", IMAGE_NAMES)
def test_dependencies_come_from_the_hashed_lock_and_tessera_alone_from_the_tree(service: str) -> None:
    # An unlocked install resolves differently next month: the same content tag, different bytes.
    installs = [r for s in stages(service) for r in s.args("RUN") if "pip install" in r]
    assert len(installs) == 2, installs
    locked, package = (shlex.split(i.split("pip install", 1)[1].split("&&")[0]) for i in installs)
    assert "--no-cache-dir" in locked and "--require-hashes" in locked
    requirements = locked[locked.index("-r") + 1]
    copies = [shlex.split(r) for s in stages(service) for r in s.args("COPY") if not r.startswith("--from")]
    assert [f"images/locks/{EXPECTED_LOCK[service]}", requirements] in copies
    assert "--no-cache-dir" in package and "--no-deps" in package
    assert [w for w in package if not w.startswith("-")] == ["."]


@pytest.mark.parametrize("service", IMAGE_NAMES)
def test_only_the_package_build_inputs_are_copied(service: str) -> None:
    # No "COPY . .": that would ship .git, .venv and anything else lying in the checkout.
    sources = set(copied_sources((IMAGES / f"{service}.Dockerfile").read_text(encoding="utf-8")))
    lock = f"images/locks/{EXPECTED_LOCK[service]}"
    assert sources == {"pyproject.toml", "README.md", "infra/", "stacks/", "services/", lock}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {f"{p.rstrip('*')}/" for p in packages} <= sources  # everything setuptools packages is there
    assert project["project"]["readme"] in sources


@pytest.mark.parametrize("service", [*IMAGE_NAMES, DATABASE_BOOTSTRAP])
def test_the_build_context_is_exactly_what_the_dockerfile_copies(service: str) -> None:
    # Without its ignore file, any change in the checkout (.venv, tests) would rebuild the image, and the
    # rebuild would try to push a content tag the immutable repository already holds.
    lines = [
        line.strip()
        for line in (ROOT / dockerignore_path(service)).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything out first
    included = {line[1:] for line in lines if line.startswith("!")}
    copied = copied_sources((IMAGES / f"{service}.Dockerfile").read_text(encoding="utf-8"))
    assert included == {source.rstrip("/") for source in copied}
    excluded = {line.removeprefix("**/") for line in lines[1:] if not line.startswith("!")}
    assert set(IGNORED_DIRS) <= excluded  # the tag skips exactly what the build never sees
    assert {f"*{suffix}" for suffix in IGNORED_SUFFIXES} <= excluded


@pytest.mark.parametrize("service", IMAGE_NAMES)
def test_images_carry_oci_labels_and_a_healthcheck_decision(service: str) -> None:
    stage = final(service)
    labels: dict[str, str] = {}
    for rest in stage.args("LABEL"):
        labels.update(assignments(rest))
    assert labels["org.opencontainers.image.title"] == f"tessera-{service_of(service)}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert len(stage.args("HEALTHCHECK")) == 1


def test_the_catalog_api_is_health_checked() -> None:
    (check,) = final("sight-catalog").args("HEALTHCHECK")
    assert "CMD" in check and "http://127.0.0.1:8080/health'" in check
    assert final("sight-catalog").args("EXPOSE") == ["8080"]


def test_the_sky_generator_installs_stellarium_and_xvfb() -> None:
    runs = " ".join(final("sky-generator").args("RUN"))
    install = re.search(r"apt-get install ([^&]*)", runs)
    assert install is not None
    assert {"stellarium", "xvfb"} <= set(install.group(1).split())


def test_real_images_get_distinct_tags() -> None:
    # Determinism is checked on a fixed tree in test_registry; this tree may change while tests run.
    tags = {s: content_tag(str(ROOT), s) for s in IMAGE_NAMES}
    assert len(set(tags.values())) == len(tags)


# ---- the database bootstrap: a Lambda image, not the tessera CLI ---------------------------------------


def test_the_bootstrap_starts_from_one_dated_build_of_the_lambda_python_311_image() -> None:
    # The bare `3.11` tag moves with every AWS rebuild: two builds under one content tag could differ.
    (stage,) = stages(DATABASE_BOOTSTRAP)
    found = re.fullmatch(
        r"public\.ecr\.aws/lambda/python:(3\.11\.\d{4}\.\d{2}\.\d{2}\.\d{2})(@sha256:[0-9a-f]{64})?",
        stage.base,
    )
    assert found is not None, stage.base
    labels: dict[str, str] = {}
    for rest in stage.args("LABEL"):
        labels.update(assignments(rest))
    assert labels["org.opencontainers.image.base.name"] == stage.base.split("@", 1)[0]
    assert labels["org.opencontainers.image.title"] == f"tessera-{DATABASE_BOOTSTRAP}"


def test_the_bootstrap_installs_its_hashed_lock_into_the_task_root_and_nothing_else() -> None:
    (stage,) = stages(DATABASE_BOOTSTRAP)
    installs = [r for r in stage.args("RUN") if "pip install" in r]
    assert len(installs) == 1, installs
    words = shlex.split(installs[0].split("pip install", 1)[1].split("&&")[0])
    assert "--require-hashes" in words and "--no-cache-dir" in words
    assert words[words.index("--target") + 1] == "${LAMBDA_TASK_ROOT}"
    requirements = words[words.index("-r") + 1]
    assert [
        w for i, w in enumerate(words) if not w.startswith("-") and words[i - 1] not in ("-r", "--target")
    ] == []
    copies = [shlex.split(r) for r in stage.args("COPY")]
    assert ["images/locks/db-bootstrap.txt", requirements] in copies
    sources = set(copied_sources((IMAGES / f"{DATABASE_BOOTSTRAP}.Dockerfile").read_text(encoding="utf-8")))
    assert sources == {"images/locks/db-bootstrap.txt", "services/"}
    assert [json.loads(c) for c in stage.args("CMD")] == [["services.cloud.database_roles.handler"]]
