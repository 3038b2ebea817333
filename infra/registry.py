"""ECR repositories for the service images, and the images themselves, built and pushed by `pulumi up`.

Each service has one repository and one Dockerfile, ``images/<service>.Dockerfile``, built with the repository
root as context. A service may have variants (the trainer: one image per accelerator), each from its own
``images/<service>-<variant>.Dockerfile`` and pushed to the service's repository under a tag that starts with
the variant's name. Images are tagged with a hash of what goes into them (the Dockerfile, its ignore file
and every file it copies, the dependency lock included), so tags are immutable and an unchanged tree never
pushes a new image.

The build paths pulumi-docker gets are relative to the Pulumi project directory (the working directory of
``pulumi up``): an absolute path would land in the stack's state, and a checkout at another path would then
differ from it, rebuild, and try to push a tag the immutable repository already holds. An image can also be
pinned to a digest built elsewhere (CI): it is then neither built nor pushed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from glob import glob

import pulumi
import pulumi_aws as aws
import pulumi_docker as docker
from pulumi import Input, Output

DOCKERFILE_DIR = "images"
# Build-input files and folders that never affect an image: caches and local environments. Each image's
# ``<Dockerfile>.dockerignore`` excludes the same, so Docker and pulumi-docker see what the tag hashes.
IGNORED_DIRS = frozenset(
    {"__pycache__", ".venv", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache", "node_modules"}
)
IGNORED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
_SERVICE_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
#: ``registry/repository@sha256:<64 hex>``: an image by its content, which no one can move.
DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9.-]*(?::[0-9]+)?/[a-z0-9][a-z0-9._/-]*@sha256:[0-9a-f]{64}$")


@dataclass
class RegistryArgs:
    """Settings of the image registry."""

    services: Sequence[str]
    """Service names; each gets a repository and is built from ``images/<service>.Dockerfile``."""
    context_dir: str
    """Where this program reads the build inputs to hash them: the repository root (absolute, or relative to
    the working directory). Never handed to pulumi-docker, so it never reaches the stack's state."""
    build_context: str = "."
    """The build context as pulumi-docker gets it, relative to the Pulumi project directory (the working
    directory of ``pulumi up``); the Dockerfiles' paths are given relative to it too."""
    variants: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Per service, the variants built beside its image: ``{"trainer": ["cuda12"]}`` builds
    ``images/trainer-cuda12.Dockerfile`` into the trainer repository (image name ``trainer-cuda12``)."""
    variants_only: Sequence[str] = ()
    """Services whose repository holds only their variants: the service's own image is neither built nor
    referenced (``["trainer"]`` with variants ``{"trainer": ["cuda12"]}``: a stack that trains on Volta alone
    builds no CUDA 13 trainer)."""
    pinned_refs: Mapping[str, str] = field(default_factory=dict)
    """Image name -> ``registry/repo@sha256:...`` built and pushed elsewhere (CI): used as is, not built."""
    kms_key_arn: Input[str] | None = None
    """KMS key that encrypts the repositories; None uses AES256 (ECR-managed keys)."""
    keep_images: int = 20
    """How many images each repository keeps; older ones expire."""
    build: bool = True
    """Build and push each image; False only declares the repositories (and computes the tags)."""
    platform: str = "linux/amd64"
    """Platform the images are built for (the worker instances are x86_64)."""
    force_delete: bool = False
    """Let `pulumi destroy` delete repositories that still hold images (throw-away stacks only)."""

    def __post_init__(self) -> None:
        _check(self)


def dockerfile_path(service: str) -> str:
    """Where an image's Dockerfile lives, relative to the context (``trainer``, ``trainer-cuda12``)."""
    return f"{DOCKERFILE_DIR}/{service}.Dockerfile"


def variant_image(service: str, variant: str) -> str:
    """The image name of one variant of a service (``trainer``, ``cuda12`` -> ``trainer-cuda12``)."""
    return f"{service}-{variant}"


def image_names(args: RegistryArgs) -> list[str]:
    """Every image the registry holds: each service's (unless ``variants_only``), then its variants'."""
    names = [s for s in args.services if s not in args.variants_only]
    for service in args.services:
        names.extend(variant_image(service, v) for v in args.variants.get(service, ()))
    return names


def dockerignore_path(service: str) -> str:
    """The Dockerfile's own ignore file (Docker and pulumi-docker prefer it to a root ``.dockerignore``)."""
    return f"{dockerfile_path(service)}.dockerignore"


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, with continuation lines joined and comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comments may sit between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            yield word.upper(), rest.strip()
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        yield word.upper(), rest.strip()


def copied_sources(dockerfile_text: str) -> list[str]:
    """The build-context paths a Dockerfile's COPY and ADD instructions read (``--from`` copies left out)."""
    sources: list[str] = []
    for instruction, arguments in dockerfile_instructions(dockerfile_text):
        if instruction not in ("COPY", "ADD"):
            continue
        rest, flags = arguments, []
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        if any(f.startswith("--from") for f in flags):
            continue  # copies from another stage or image, not from the context
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        sources.extend(s for s in args[:-1] if not s.startswith("<<"))
    return sources


def _ignored(name: str) -> bool:
    return name in IGNORED_DIRS or name.endswith(IGNORED_SUFFIXES)


def _files_under(context_dir: str, source: str) -> list[str]:
    """Context-relative paths of the files one COPY source names (globs expanded, caches skipped)."""
    matches = sorted(glob(os.path.join(context_dir, source.lstrip("/"))))
    files: list[str] = []
    for match in matches:
        if os.path.isfile(match):
            files.append(os.path.relpath(match, context_dir))
            continue
        for root, dirs, names in os.walk(match):
            dirs[:] = sorted(d for d in dirs if not _ignored(d))
            files.extend(
                os.path.relpath(os.path.join(root, n), context_dir) for n in names if not _ignored(n)
            )
    return files


def content_tag(context_dir: str, service: str, platform: str = "linux/amd64") -> str:
    """A tag that changes whenever the image's inputs change: Dockerfile, ignore file, copied files, platform.

    Paths are hashed with their permission bits and contents, in sorted order (what pulumi-docker also
    hashes to decide on a rebuild, so a rebuild never re-pushes an existing immutable tag). Sources the
    Dockerfile names but the context lacks are hashed as missing (the build will say so).
    """
    with open(os.path.join(context_dir, dockerfile_path(service)), "rb") as fh:
        dockerfile_bytes = fh.read()
    digest = hashlib.sha256()
    digest.update(f"platform={platform}\0".encode())
    digest.update(b"dockerfile\0" + hashlib.sha256(dockerfile_bytes).digest())
    ignore_file = os.path.join(context_dir, dockerignore_path(service))
    if os.path.isfile(ignore_file):
        with open(ignore_file, "rb") as fh:
            digest.update(b"dockerignore\0" + hashlib.sha256(fh.read()).digest())
    files: set[str] = set()
    for source in copied_sources(dockerfile_bytes.decode("utf-8")):
        found = _files_under(context_dir, source)
        if not found:
            digest.update(f"missing:{source}\0".encode())
        files.update(found)
    for rel in sorted(files):
        path = os.path.join(context_dir, rel)
        with open(path, "rb") as fh:
            content = hashlib.sha256(fh.read()).digest()
        mode = stat.S_IMODE(os.stat(path).st_mode)
        digest.update(f"{rel.replace(os.sep, '/')}\0{mode:o}\0".encode() + content)
    return digest.hexdigest()[:16]


class Registry(pulumi.ComponentResource):
    """One private, scanned, immutable-tag ECR repository per service, each with its service's image."""

    repository_urls: dict[str, pulumi.Output[str]]
    repository_arns: dict[str, pulumi.Output[str]]
    repository_names: dict[str, pulumi.Output[str]]
    image_refs: dict[str, pulumi.Output[str]]
    """Per image name (service or variant): what to run, the pushed image's digest reference, the pinned
    digest, or ``<url>:<content tag>`` when not building."""
    image_tags: dict[str, str]
    """The content tag of each image (a variant's starts with the variant's name: ``cuda12-<hash>``)."""

    def __init__(self, name: str, args: RegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Registry", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.repositories: dict[str, aws.ecr.Repository] = {}
        self.images: dict[str, docker.Image] = {}
        self.repository_urls, self.repository_arns, self.repository_names = {}, {}, {}
        self.image_refs, self.image_tags = {}, {}
        encryption = (
            aws.ecr.RepositoryEncryptionConfigurationArgs(encryption_type="KMS", kms_key=args.kms_key_arn)
            if args.kms_key_arn is not None
            else aws.ecr.RepositoryEncryptionConfigurationArgs(encryption_type="AES256")
        )
        lifecycle = json.dumps(_lifecycle_policy(args.keep_images))
        for service in args.services:
            repo = aws.ecr.Repository(
                f"{name}-{service}",
                image_tag_mutability="IMMUTABLE",
                image_scanning_configuration=aws.ecr.RepositoryImageScanningConfigurationArgs(
                    scan_on_push=True
                ),
                encryption_configurations=[encryption],
                force_delete=args.force_delete,
                opts=child,
            )
            aws.ecr.LifecyclePolicy(
                f"{name}-{service}-lifecycle", repository=repo.name, policy=lifecycle, opts=child
            )
            self.repositories[service] = repo
            self.repository_urls[service] = repo.repository_url
            self.repository_arns[service] = repo.arn
            self.repository_names[service] = repo.name
            own = [] if service in args.variants_only else [(service, "")]
            images = own + [(variant_image(service, v), v) for v in args.variants.get(service, ())]
            for image_name, variant in images:
                self._image(name, args=args, repo=repo, image=image_name, variant=variant, child=child)
        self.register_outputs(
            {
                "repository_urls": self.repository_urls,
                "repository_arns": self.repository_arns,
                "image_refs": self.image_refs,
                "image_tags": self.image_tags,
            }
        )

    def _image(
        self,
        name: str,
        *,
        args: RegistryArgs,
        repo: aws.ecr.Repository,
        image: str,
        variant: str,
        child: pulumi.ResourceOptions,
    ) -> None:
        """Tag (and unless pinned or not building, build and push) one image into ``repo``."""
        tag = content_tag(args.context_dir, image, args.platform)
        if variant:
            tag = f"{variant}-{tag}"
        self.image_tags[image] = tag
        if image in args.pinned_refs:
            self.image_refs[image] = Output.from_input(args.pinned_refs[image])
            return
        image_name = Output.concat(repo.repository_url, ":", tag)
        if not args.build:
            self.image_refs[image] = image_name
            return
        # The instance role never pushes; the deployer's credentials get a short-lived token here.
        token = aws.ecr.get_authorization_token_output(
            registry_id=repo.registry_id, opts=pulumi.InvokeOptions(parent=self)
        )
        built = docker.Image(
            f"{name}-{image}-image",
            build=docker.DockerBuildArgs(
                # Relative to the project directory: the same inputs from every checkout (see the module doc).
                context=args.build_context,
                dockerfile=posixpath.normpath(posixpath.join(args.build_context, dockerfile_path(image))),
                platform=args.platform,
            ),
            image_name=image_name,
            registry=docker.RegistryArgs(
                server=repo.repository_url,
                username=token.user_name,
                password=Output.secret(token.password),
            ),
            opts=child,
        )
        self.images[image] = built
        # The digest, not the tag, so that a consumer's launch template changes with every new push.
        self.image_refs[image] = built.repo_digest


def _check(args: RegistryArgs) -> None:
    seen: set[str] = set()
    for service in args.services:
        if not _SERVICE_NAME.match(service):
            raise ValueError(f"service name {service!r}: use lower-case letters, digits and single hyphens")
        if service in seen:
            raise ValueError(f"service {service!r} is listed twice in RegistryArgs.services")
        seen.add(service)
    for service, variants in args.variants.items():
        if service not in seen:
            raise ValueError(
                f"RegistryArgs.variants names {service!r}, which is not in RegistryArgs.services"
            )
        for variant in variants:
            if not _SERVICE_NAME.match(variant):
                raise ValueError(
                    f"variant {variant!r} of {service!r}: use lower-case letters, digits, hyphens"
                )
    for service in args.variants_only:
        if not args.variants.get(service):
            raise ValueError(
                f"RegistryArgs.variants_only names {service!r}, which has no variants: its repository would "
                "hold no image"
            )
    names = image_names(args)
    if len(set(names)) != len(names):
        raise ValueError(f"image names collide: {', '.join(sorted(n for n in names if names.count(n) > 1))}")
    for image in names:
        path = os.path.join(args.context_dir, dockerfile_path(image))
        if not os.path.isfile(path):
            raise ValueError(
                f"service {image!r} has no Dockerfile: write {dockerfile_path(image)} "
                f"(looked for {os.path.abspath(path)})"
            )
    for image, ref in args.pinned_refs.items():
        if image not in names:
            raise ValueError(f"pinned image {image!r} is not one of the images: {', '.join(names)}")
        if not DIGEST_REF.match(ref):
            raise ValueError(
                f"pinned image {image!r}: {ref!r} is not a digest reference (registry/repo@sha256:...)"
            )
    if os.path.isabs(args.build_context) or args.build_context.startswith(".."):
        raise ValueError(
            f"build_context {args.build_context!r} must be relative to the Pulumi project directory and "
            "inside it (an absolute path lands in the stack's state and differs between checkouts)"
        )
    if args.keep_images < 1:
        raise ValueError(f"keep_images must be at least 1, got {args.keep_images}")


def _lifecycle_policy(keep_images: int) -> dict[str, object]:
    # A rule with tagStatus "any" must have the highest rulePriority, so untagged expiry comes first.
    return {
        "rules": [
            {
                "rulePriority": 1,
                "description": "Expire untagged images after 7 days",
                "selection": {
                    "tagStatus": "untagged",
                    "countType": "sinceImagePushed",
                    "countUnit": "days",
                    "countNumber": 7,
                },
                "action": {"type": "expire"},
            },
            {
                "rulePriority": 2,
                "description": f"Keep the last {keep_images} images",
                "selection": {
                    "tagStatus": "any",
                    "countType": "imageCountMoreThan",
                    "countNumber": keep_images,
                },
                "action": {"type": "expire"},
            },
        ]
    }
