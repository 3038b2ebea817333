"""The image lock files (images/locks/*.txt, made by images/lock.sh) agree with pyproject.toml: every direct
dependency an image installs is pinned there, within pyproject's range unless the lock's override file says
otherwise, and every pin carries hashes (the Dockerfiles install with --require-hashes)."""

from __future__ import annotations

import os
import re
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


def _direct(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return wanted


def test_every_lock_is_listed_here_and_made_by_the_one_script() -> None:
    assert {p.name for p in LOCKS.glob("*.txt")} == set(EXTRAS)
    script = ROOT / "images" / "lock.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text(encoding="utf-8")
    for name in EXTRAS:
        assert f"compile {name} " in text, name
    assert "--generate-hashes" in text and "x86_64-manylinux_2_28" in text


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_the_lock_pins_every_direct_dependency_with_hashes(name: str) -> None:
    lock = LOCKS / name
    pins = _pins(lock)
    assert pins, name
    assert all(hashes > 0 for _, hashes in pins.values()), [p for p, (_, h) in pins.items() if h == 0]
    overrides = _overrides(lock)
    for requirement in _direct(EXTRAS[name]):
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


@pytest.mark.parametrize("name", sorted(EXTRAS))
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
