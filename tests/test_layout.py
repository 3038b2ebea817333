"""The repository layout and the dependency rules of ARCHITECTURE.md, checked on the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"infra", "stacks", "services", "images", "tests", "Pulumi.yaml", "pyproject.toml"}
#: The CLI is the one module that may reach both halves (lazily, per command).
FRONT_DOOR = ROOT / "services" / "cli.py"


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_top_level_layout() -> None:
    present = {p.name for p in ROOT.iterdir()}
    assert present >= TOP_LEVEL
    assert "Pulumi.dev.yaml" in present


def test_services_never_import_infra_or_stacks() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "services").rglob("*.py")
        if p != FRONT_DOOR and imported_roots(p) & {"infra", "stacks"}
    ]
    assert offenders == []


def test_infra_never_imports_services_or_stacks() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "infra").rglob("*.py")
        if imported_roots(p) & {"services", "stacks"}
    ]
    assert offenders == []


def test_the_front_door_reaches_both_halves_only_lazily() -> None:
    tree = ast.parse(FRONT_DOOR.read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
    assert not top_level & {"infra", "stacks"}, "tessera's CLI must import the Pulumi half per command"


def test_no_plain_onnxruntime_beside_the_gpu_build() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"onnxruntime>' not in text and '"onnxruntime=' not in text and '"onnxruntime"' not in text
