"""The repository layout and dependency rules of docs/ARCHITECTURE.md, checked on the import statements."""

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


#: The service packages; everything else under services/ is a shared library (or the CLI front door).
SERVICE_PACKAGES = {
    "model_runner",
    "trainer",
    "autostop",
    "sky_generator",
    "fits_classifier",
    "sight_catalog",
}


def imported_service_packages(path: Path) -> set[str]:
    """The ``services.X`` packages a module imports (``X`` only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "services":
                names.update(f"services.{alias.name}" for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("services.") and n.count(".") >= 1}


def test_a_service_package_imports_shared_libraries_never_another_service() -> None:
    present = {p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()}
    assert present >= SERVICE_PACKAGES
    offenders = []
    for package in sorted(SERVICE_PACKAGES):
        for path in (ROOT / "services" / package).rglob("*.py"):
            others = imported_service_packages(path) & (SERVICE_PACKAGES - {package})
            if others:
                offenders.append(f"{path.relative_to(ROOT)} imports {sorted(others)}")
    assert offenders == []
    # Shared libraries serve every service, so they import none.
    for path in (ROOT / "services").rglob("*.py"):
        top = path.relative_to(ROOT / "services").parts[0]
        if top not in SERVICE_PACKAGES and path != FRONT_DOOR:
            assert not imported_service_packages(path) & SERVICE_PACKAGES, path


def test_test_files_have_unique_names() -> None:
    """pytest imports test modules by their base name (no packages under tests/): two files of one name in
    different folders fail collection of the whole run, which a run of one folder never shows."""
    seen: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name != "conftest.py":
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
