"""The image lock files (images/locks/*.txt, made by images/lock.sh) agree with pyproject.toml: every direct
dependency an image installs is pinned there, within pyproject's range unless the lock's override file says
otherwise, and every pin carries hashes (the Dockerfiles install with --require-hashes). The database
bootstrap's lock holds only what its code imports."""

from __future__ import annotations

import ast
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "images" / "locks"
#: Each lock and the pyproject extras its images install on top of the runtime dependencies.
EXTRAS = {
    "services.txt": (),
    "trainer-cuda13.txt": ("train",),
    "trainer-cuda12.txt": ("train",),
    "trainer-gaudi.txt": ("train",),
}
#: Locks of a few packages rather than of pyproject: each lock and the input file naming what it installs.
SUBSETS = {"db-bootstrap.txt": "db-bootstrap.in"}
LOCK_NAMES = sorted({*EXTRAS, *SUBSETS})
#: Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"psycopg": "psycopg"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")


def _pins(lock: Path) -> dict[str, tuple[str, int]]:
    """Package -> (version, number of hashes) of a pip-compile style lock."""
    pins: dict[str, tuple[str, int]] = {}
    current: str | None = None
    for line in lock.read_text(encoding="utf-8").splitlines():
        found = PIN.match(line)
        if found:
            current = canonicalize_name(found.group(1))
            pins[current] = (found.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif not line.startswith(" "):
            current = None
    return pins


def _overrides(lock: Path) -> dict[str, Requirement]:
    path = lock.with_suffix(".overrides")
    if not path.exists():
        return {}
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return {canonicalize_name(r.name): r for r in (Requirement(line) for line in lines if line)}


def _project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return wanted


def _subset(name: str) -> list[Requirement]:
    lines = (LOCKS / SUBSETS[name]).read_text(encoding="utf-8").splitlines()
    return [Requirement(line.split("#", 1)[0].strip()) for line in lines if line.split("#", 1)[0].strip()]


def _direct(name: str) -> list[Requirement]:
    """What an image installs directly, with pyproject's range (a subset lock: the range of the same name)."""
    every = _project_requirements(EXTRAS.get(name, ()))
    if name not in SUBSETS:
        return every
    ranges = {canonicalize_name(r.name): r for r in every}
    return [ranges[canonicalize_name(r.name)] for r in _subset(name)]


def test_every_lock_is_listed_here_and_made_by_the_one_script() -> None:
    assert {p.name for p in LOCKS.glob("*.txt")} == set(LOCK_NAMES)
    script = ROOT / "images" / "lock.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text(encoding="utf-8")
    for name in LOCK_NAMES:
        assert f"compile {name} " in text, name
    assert "--generate-hashes" in text and "x86_64-manylinux_2_28" in text
    # The bootstrap's Lambda base is Amazon Linux 2 (glibc 2.26): manylinux_2_28 wheels would not load there.
    assert "amazon_linux_2=x86_64-manylinux_2_17" in text
    assert 'compile db-bootstrap.txt 3.11 "$amazon_linux_2" "$locks/db-bootstrap.in"' in text


@pytest.mark.parametrize("name", LOCK_NAMES)
def test_the_lock_pins_every_direct_dependency_with_hashes(name: str) -> None:
    lock = LOCKS / name
    pins = _pins(lock)
    assert pins, name
    assert all(hashes > 0 for _, hashes in pins.values()), [p for p, (_, h) in pins.items() if h == 0]
    overrides = _overrides(lock)
    for requirement in _direct(name):
        key = canonicalize_name(requirement.name)
        override = overrides.get(key)
        if override is not None and override.marker is not None and not override.marker.evaluate():
            # Left out on purpose (the Gaudi base image brings its own torch): it must not be installed.
            assert key not in pins, f"{name}: {key} is overridden away but pinned"
            continue
        assert key in pins, f"{name}: {requirement} is not pinned; run images/lock.sh"
        version = pins[key][0]
        spec = override.specifier if override is not None else requirement.specifier
        assert spec.contains(version, prereleases=True), f"{name}: {key}=={version} is outside {spec}"


@pytest.mark.parametrize("name", LOCK_NAMES)
def test_the_lock_reads_the_same_from_every_checkout(name: str) -> None:
    # The lock is a build input the content tag hashes: no machine's path may be written into it.
    text = (LOCKS / name).read_text(encoding="utf-8")
    assert "#    images/lock.sh" in text
    assert not re.search(r"(^|\s)/(home|root|tmp|work|Users)/", text)


def test_the_volta_trainer_pins_the_torch_that_still_has_sm70() -> None:
    assert _pins(LOCKS / "trainer-cuda12.txt")["torch"][0] == "2.10.0"
    assert "nvidia-cuda-runtime-cu12" in _pins(LOCKS / "trainer-cuda12.txt")
    assert _pins(LOCKS / "trainer-cuda13.txt")["torch"][0] == "2.13.0"
    assert "torch" not in _pins(LOCKS / "trainer-gaudi.txt")


def _third_party_imports(module: str) -> set[str]:
    """Top-level names of the non-standard, non-project modules ``module`` and the project modules it
    imports (at any depth, also inside functions, and their packages' ``__init__``) import."""
    seen: set[str] = set()
    found: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # a module's packages run their __init__ first
            package = ".".join(parts[:depth])
            if package in seen:
                continue
            seen.add(package)
            base = ROOT.joinpath(*package.split("."))
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if not path.is_file():
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                for imported in names:
                    root = imported.split(".")[0]
                    if root == parts[0]:
                        todo.append(imported)
                    elif root not in sys.stdlib_module_names and root != "__future__":
                        found.add(root)
    return found


def test_the_bootstrap_lock_holds_exactly_what_the_bootstrap_imports() -> None:
    # The Lambda image holds the services tree but none of tessera's other dependencies: an import of
    # anything else would fail only when `pulumi up` invokes the function.
    imported = _third_party_imports("services.cloud.database_roles")
    wanted = {canonicalize_name(r.name) for r in _subset("db-bootstrap.txt")}
    assert {canonicalize_name(DISTRIBUTIONS.get(i, i)) for i in imported} == wanted
    assert wanted == {"psycopg", "boto3"}
    assert [str(r) for r in _subset("db-bootstrap.txt") if r.name == "psycopg"] == ["psycopg[binary]"]


def test_the_bootstrap_runs_the_services_versions() -> None:
    # Compiled with services.txt as constraints: the bootstrap and the services share psycopg and boto3.
    bootstrap, services = _pins(LOCKS / "db-bootstrap.txt"), _pins(LOCKS / "services.txt")
    for package, (version, _) in bootstrap.items():
        assert services[package][0] == version, package
    assert {"psycopg", "psycopg-binary", "boto3", "botocore"} <= set(bootstrap)
    assert "numpy" not in bootstrap and "pulumi" not in bootstrap  # only what the function imports
