"""Image registry: scanned, immutable, self-cleaning repositories; images tagged by what goes into them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from infra.registry import Registry, RegistryArgs, content_tag, copied_sources
from infra.trainer_images import VARIANT_IMAGES
from stacks.offline import OfflineRun

REPO = "aws:ecr/repository:Repository"
LIFECYCLE = "aws:ecr/lifecyclePolicy:LifecyclePolicy"
IMAGE = "docker:index/image:Image"
TOKEN_CALL = "aws:ecr/getAuthorizationToken:getAuthorizationToken"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000-ecr"
SERVICES = ("model-runner", "sight-catalog")
# A secret input reaches the engine wrapped in an object carrying this signature key.
SECRET_SIG = "4dabf18193072939515e22adb298388d"

DOCKERFILE = """\
FROM python:3.11.14-slim-bookworm AS build
COPY pyproject.toml README.md ./
COPY --chown=10001:10001 services/ services/
RUN pip install --no-cache-dir .
FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/venv /opt/venv
CMD ["worker", "{service}"]
"""


def _context(root: Path, services: Sequence[str] = SERVICES) -> Path:
    """A small build context laid out like the repository."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'tessera'\n")
    (root / "README.md").write_text("# tessera\n")
    (root / "services" / "runner").mkdir(parents=True)
    (root / "services" / "__init__.py").write_text("")
    (root / "services" / "runner" / "worker.py").write_text("def main() -> None: ...\n")
    (root / "infra").mkdir()
    (root / "infra" / "network.py").write_text("# not copied by these Dockerfiles\n")
    (root / "images").mkdir()
    for service in services:
        (root / "images" / f"{service}.Dockerfile").write_text(DOCKERFILE.replace("{service}", service))
    return root


def _registry(
    offline: Callable[..., OfflineRun], context: Path, services: Sequence[str] = SERVICES, **args: Any
) -> OfflineRun:
    def program() -> dict[str, Any]:
        registry = Registry("ecr", RegistryArgs(services=services, context_dir=str(context), **args))
        return {
            "urls": registry.repository_urls,
            "arns": registry.repository_arns,
            "refs": registry.image_refs,
            "tags": registry.image_tags,
        }

    return offline(program)


def _unsecret(value: Any) -> Any:
    return value["value"] if isinstance(value, dict) and SECRET_SIG in value else value


def test_repositories_are_scanned_immutable_and_kms_encrypted(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    run = _registry(offline, _context(tmp_path), kms_key_arn=KEY_ARN)
    repos = {r.name: r for r in run.of_type(REPO)}
    assert set(repos) == {"ecr-model-runner", "ecr-sight-catalog"}
    for repo in repos.values():
        assert repo.inputs["imageTagMutability"] == "IMMUTABLE"
        assert repo.inputs["imageScanningConfiguration"] == {"scanOnPush": True}
        assert repo.inputs["encryptionConfigurations"] == [{"encryptionType": "KMS", "kmsKey": KEY_ARN}]
        assert repo.inputs["forceDelete"] is False  # images survive a careless destroy
        assert repo.parent == "ecr"
    assert run.outputs["urls"]["model-runner"] == repos["ecr-model-runner"].outputs["repositoryUrl"]
    assert run.outputs["arns"]["sight-catalog"] == repos["ecr-sight-catalog"].outputs["arn"]


def test_without_a_key_repositories_use_aes256(offline: Callable[..., OfflineRun], tmp_path: Path) -> None:
    run = _registry(offline, _context(tmp_path), force_delete=True)
    for repo in run.of_type(REPO):
        assert repo.inputs["encryptionConfigurations"] == [{"encryptionType": "AES256"}]
        assert repo.inputs["forceDelete"] is True


def test_lifecycle_keeps_the_last_images_and_expires_untagged(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    run = _registry(offline, _context(tmp_path), keep_images=7)
    repos = {r.outputs["name"] for r in run.of_type(REPO)}
    policies = run.of_type(LIFECYCLE)
    assert {p.inputs["repository"] for p in policies} == repos  # one per repository
    for policy in policies:
        rules = json.loads(policy.inputs["policy"])["rules"]
        untagged = next(r for r in rules if r["selection"]["tagStatus"] == "untagged")
        assert untagged["selection"] == {
            "tagStatus": "untagged",
            "countType": "sinceImagePushed",
            "countUnit": "days",
            "countNumber": 7,
        }
        keep = next(r for r in rules if r["selection"]["tagStatus"] == "any")
        assert keep["selection"]["countType"] == "imageCountMoreThan"
        assert keep["selection"]["countNumber"] == 7
        assert all(r["action"] == {"type": "expire"} for r in rules)
        # ECR requires the "any" rule to carry the highest priority number.
        assert keep["rulePriority"] == max(r["rulePriority"] for r in rules)


def test_one_image_per_service_built_for_amd64_and_tagged_by_content(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    context = _context(tmp_path)
    run = _registry(offline, context)
    images = {i.name: i for i in run.of_type(IMAGE)}
    assert set(images) == {"ecr-model-runner-image", "ecr-sight-catalog-image"}
    repos = {r.name: r for r in run.of_type(REPO)}
    for service in SERVICES:
        image, repo = images[f"ecr-{service}-image"], repos[f"ecr-{service}"]
        build = image.inputs["build"]
        assert build["platform"] == "linux/amd64"
        # Relative to the project directory (the cwd of `pulumi up`): no checkout path lands in the state.
        assert build["context"] == "."
        assert build["dockerfile"] == f"images/{service}.Dockerfile"
        assert (context / build["dockerfile"]).is_file()
        tag = content_tag(str(context), service)
        assert run.outputs["tags"][service] == tag
        assert image.inputs["imageName"] == f"{repo.outputs['repositoryUrl']}:{tag}"
        assert image.inputs.get("skipPush") is not True
        # What consumers run is the pushed digest, never a movable tag.
        assert run.outputs["refs"][service] == image.outputs["repoDigest"]
        assert "@sha256:" in run.outputs["refs"][service]


def test_push_credentials_come_from_ecr_and_stay_secret(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    run = _registry(offline, _context(tmp_path))
    image = run.named(IMAGE, "ecr-model-runner-image")
    assert SECRET_SIG in image.inputs["registry"]  # the token never lands in state in plain text
    registry = _unsecret(image.inputs["registry"])
    repo = run.named(REPO, "ecr-model-runner")
    assert registry == {
        "server": repo.outputs["repositoryUrl"],
        "username": "AWS",
        "password": "offline-token",
    }
    tokens = [args for token, args in run.mocks.calls if token == TOKEN_CALL]
    assert tokens and all(args["registryId"] == repo.outputs["registryId"] for args in tokens)


def test_build_false_declares_repositories_and_refs_without_images(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    context = _context(tmp_path)
    run = _registry(offline, context, build=False)
    assert run.of_type(IMAGE) == []
    assert not [c for c, _ in run.mocks.calls if c == TOKEN_CALL]
    assert len(run.of_type(REPO)) == 2
    url = run.named(REPO, "ecr-model-runner").outputs["repositoryUrl"]
    assert run.outputs["refs"]["model-runner"] == f"{url}:{content_tag(str(context), 'model-runner')}"


def test_content_tag_follows_the_build_inputs(tmp_path: Path) -> None:
    context = _context(tmp_path)
    tag = content_tag(str(context), "model-runner")
    assert tag == content_tag(str(context), "model-runner")  # deterministic
    assert tag != content_tag(str(context), "sight-catalog")  # each image has its own
    assert tag != content_tag(str(context), "model-runner", platform="linux/arm64")

    # Noise the image never sees leaves the tag alone.
    (context / "services" / "runner" / "__pycache__").mkdir()
    (context / "services" / "runner" / "__pycache__" / "worker.cpython-311.pyc").write_bytes(b"\0\1")
    (context / ".venv").mkdir()
    (context / "infra" / "network.py").write_text("# changed, but this Dockerfile does not copy infra/\n")
    assert content_tag(str(context), "model-runner") == tag

    # A copied file's content changes the tag, and so does the Dockerfile.
    (context / "services" / "runner" / "worker.py").write_text("def main() -> None: print('v2')\n")
    changed_code = content_tag(str(context), "model-runner")
    assert changed_code != tag
    dockerfile = context / "images" / "model-runner.Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "LABEL org.opencontainers.image.version=2\n")
    assert content_tag(str(context), "model-runner") not in (tag, changed_code)


def test_a_new_file_in_a_copied_folder_changes_the_tag(tmp_path: Path) -> None:
    context = _context(tmp_path)
    tag = content_tag(str(context), "model-runner")
    (context / "services" / "runner" / "tiles.py").write_text("")
    assert content_tag(str(context), "model-runner") != tag


def test_what_pulumi_docker_rebuilds_on_also_changes_the_tag(tmp_path: Path) -> None:
    # pulumi-docker rebuilds when the ignore file or a file's mode changes; re-pushing the old tag would fail.
    context = _context(tmp_path)
    tag = content_tag(str(context), "model-runner")
    worker = context / "services" / "runner" / "worker.py"
    worker.chmod(worker.stat().st_mode | 0o111)
    executable = content_tag(str(context), "model-runner")
    assert executable != tag
    (context / "images" / "model-runner.Dockerfile.dockerignore").write_text("*\n!services\n")
    assert content_tag(str(context), "model-runner") not in (tag, executable)


def test_changing_the_dockerfile_changes_the_pushed_image_name(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    context = _context(tmp_path)
    before = _registry(offline, context).named(IMAGE, "ecr-model-runner-image").inputs["imageName"]
    dockerfile = context / "images" / "model-runner.Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("slim-bookworm", "slim-trixie"))
    after = _registry(offline, context).named(IMAGE, "ecr-model-runner-image").inputs["imageName"]
    assert before.rsplit(":", 1)[0] == after.rsplit(":", 1)[0]
    assert before != after


def test_a_missing_dockerfile_says_which_file_to_write(tmp_path: Path) -> None:
    context = _context(tmp_path, services=("model-runner",))
    with pytest.raises(
        ValueError, match=r"'sky-generator' has no Dockerfile: write images/sky-generator\.Dockerfile"
    ):
        RegistryArgs(services=["model-runner", "sky-generator"], context_dir=str(context))


@pytest.mark.parametrize("services", [["Model Runner"], ["model-runner", "model-runner"]])
def test_bad_service_lists_are_rejected(tmp_path: Path, services: list[str]) -> None:
    context = _context(tmp_path, services=("model-runner",))
    with pytest.raises(ValueError, match="service"):
        RegistryArgs(services=services, context_dir=str(context))


def test_copied_sources_reads_every_copy_form() -> None:
    text = """\
# syntax=docker/dockerfile:1
FROM scratch AS build
COPY pyproject.toml \\
     README.md ./
COPY --chown=1:1 --chmod=644 ["stacks/", "stacks/"]
ADD infra/ /src/infra/
COPY --from=build /opt/venv /opt/venv
COPY --from=ghcr.io/astral-sh/uv:0.13.0 /uv /bin/uv
RUN echo COPY nothing
"""
    assert copied_sources(text) == ["pyproject.toml", "README.md", "stacks/", "infra/"]


DIGEST = "123456789012.dkr.ecr.us-east-1.amazonaws.com/ci/trainer@sha256:" + "ab" * 32


def test_a_checkout_at_another_path_builds_the_same_images_and_pushes_nothing_new(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    # The same tree at two absolute paths (a CI runner, a laptop): same tags, and pulumi-docker sees the same
    # inputs, so `pulumi up` from the second finds no change and pushes nothing the immutable repo holds.
    here = _context(tmp_path / "home" / "me" / "tessera")
    there = _context(tmp_path / "ci" / "runner" / "work" / "checkout")
    runs = [_registry(offline, context) for context in (here, there)]
    assert runs[0].outputs["tags"] == runs[1].outputs["tags"]
    images = [{i.name: i.inputs for i in run.of_type(IMAGE)} for run in runs]
    assert images[0] == images[1]
    assert set(images[0]) == {"ecr-model-runner-image", "ecr-sight-catalog-image"}
    for inputs in images[0].values():
        text = json.dumps(inputs)
        assert str(tmp_path) not in text
        assert not any(value.startswith("/") for value in inputs["build"].values() if isinstance(value, str))


def test_absolute_or_escaping_build_contexts_are_refused(tmp_path: Path) -> None:
    context = _context(tmp_path)
    for bad in (str(context), "../elsewhere"):
        with pytest.raises(ValueError, match="relative to the Pulumi project directory"):
            RegistryArgs(services=SERVICES, context_dir=str(context), build_context=bad)


def test_variants_are_built_into_the_service_repository_under_their_own_tags(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    context = _context(tmp_path, services=(*SERVICES, "model-runner-cuda12"))
    run = _registry(offline, context, variants={"model-runner": ["cuda12"]})
    assert len(run.of_type(REPO)) == 2  # no repository of its own: the service's role can pull it
    image = run.named(IMAGE, "ecr-model-runner-cuda12-image")
    url = run.named(REPO, "ecr-model-runner").outputs["repositoryUrl"]
    tag = run.outputs["tags"]["model-runner-cuda12"]
    assert tag == "cuda12-" + content_tag(str(context), "model-runner-cuda12")
    assert image.inputs["imageName"] == f"{url}:{tag}"
    assert image.inputs["build"]["dockerfile"] == "images/model-runner-cuda12.Dockerfile"
    assert run.outputs["refs"]["model-runner-cuda12"] == image.outputs["repoDigest"]
    assert run.outputs["refs"]["model-runner-cuda12"] != run.outputs["refs"]["model-runner"]
    with pytest.raises(ValueError, match=r"has no Dockerfile: write images/model-runner-gaudi\.Dockerfile"):
        RegistryArgs(services=SERVICES, context_dir=str(context), variants={"model-runner": ["gaudi"]})


def test_a_service_may_hold_only_its_variants(offline: Callable[..., OfflineRun], tmp_path: Path) -> None:
    # A stack that trains on Volta alone builds the CUDA 12 trainer, not the service's own (CUDA 13) image.
    context = _context(tmp_path, services=(*SERVICES, "model-runner-cuda12"))
    run = _registry(offline, context, variants={"model-runner": ["cuda12"]}, variants_only=["model-runner"])
    assert {i.name for i in run.of_type(IMAGE)} == {
        "ecr-model-runner-cuda12-image",
        "ecr-sight-catalog-image",
    }
    assert set(run.outputs["refs"]) == {"model-runner-cuda12", "sight-catalog"}
    assert len(run.of_type(REPO)) == 2  # the repository is still there, holding the variant
    with pytest.raises(ValueError, match=r"variants_only names 'sight-catalog', which has no variants"):
        RegistryArgs(services=SERVICES, context_dir=str(context), variants_only=["sight-catalog"])
    with pytest.raises(ValueError, match="not one of the images"):
        RegistryArgs(
            services=SERVICES,
            context_dir=str(context),
            variants={"model-runner": ["cuda12"]},
            variants_only=["model-runner"],
            pinned_refs={"model-runner": DIGEST},
        )


def test_a_pinned_digest_is_run_as_is_and_never_built(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    context = _context(tmp_path)
    run = _registry(offline, context, pinned_refs={"model-runner": DIGEST})
    assert run.outputs["refs"]["model-runner"] == DIGEST
    assert [i.name for i in run.of_type(IMAGE)] == ["ecr-sight-catalog-image"]
    for pins, message in (
        ({"model-runner": DIGEST.replace("@sha256:" + "ab" * 32, ":v1")}, "not a digest reference"),
        ({"no-such-image": DIGEST}, "not one of the images"),
    ):
        with pytest.raises(ValueError, match=message):
            RegistryArgs(services=SERVICES, context_dir=str(context), pinned_refs=pins)


def test_the_real_trainers_tags_cover_their_dependency_locks(tmp_path: Path) -> None:
    # Copy the real trainer Dockerfiles, their ignore files and locks: a new lock must give a new tag, or the
    # rebuilt image would be pushed under a tag the immutable repository already holds.
    root = Path(__file__).resolve().parents[2]
    context = _context(tmp_path, services=())
    (context / "stacks").mkdir()
    images = list(VARIANT_IMAGES.values())
    shutil.copytree(root / "images" / "locks", context / "images" / "locks")
    for image in images:
        for suffix in (".Dockerfile", ".Dockerfile.dockerignore"):
            shutil.copy(root / "images" / f"{image}{suffix}", context / "images" / f"{image}{suffix}")
    before = {image: content_tag(str(context), image) for image in images}
    assert len(set(before.values())) == len(images)
    for image in images:
        lock = next(
            s
            for s in copied_sources((context / "images" / f"{image}.Dockerfile").read_text())
            if s.startswith("images/locks/")
        )
        with (context / lock).open("a") as fh:
            fh.write("# relocked\n")
        assert content_tag(str(context), image) != before[image], image
