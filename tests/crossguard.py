"""The policy pack's path for tests: an offline run's resources shaped as pulumi-policy hands them over.

A stack validation gets ``args.resources``: ``PolicyResource`` s with ``resource_type``, ``props`` (outputs,
inputs among them), ``urn``, ``name``, ``opts.protect``, ``parent`` (the parent's PolicyResource) and
``property_dependencies``. :func:`policy_resources` builds those from an :class:`OfflineRun` (no pulumi-policy
import needed: the rules read attributes); :func:`as_preview` makes them look like a first preview, where
every id and ARN is still unknown; :func:`violations` runs every policy of ``policy/tessera_policies.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from stacks.offline import OfflineRun

ROOT = Path(__file__).resolve().parent.parent
#: The engine's sentinel for an unknown string (pulumi-policy's proxy.py).
UNKNOWN_STRING = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


@cache
def policies() -> ModuleType:
    """policy/tessera_policies.py, imported from its file (the pack is a folder, not a package)."""
    path = ROOT / "policy" / "tessera_policies.py"
    spec = importlib.util.spec_from_file_location("tessera_policies", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tessera_policies"] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class PolicyResourceShape:
    """The attributes of pulumi-policy's ``PolicyResource`` that a stack validation reads."""

    resource_type: str
    props: dict[str, Any]
    urn: str
    name: str
    opts: Any
    provider: Any = None
    parent: PolicyResourceShape | None = None
    dependencies: list[PolicyResourceShape] = field(default_factory=list)
    property_dependencies: dict[str, list[PolicyResourceShape]] = field(default_factory=dict)


def policy_resources(run: OfflineRun, stack: str = "dev") -> list[PolicyResourceShape]:
    """Every resource of ``run`` as the engine shows it to a policy pack running on ``stack``."""
    shaped = {
        (r.type, r.name): PolicyResourceShape(
            r.type,
            {**r.inputs, **r.outputs},
            f"urn:pulumi:{stack}::tessera::{r.type}::{r.name}",
            r.name,
            SimpleNamespace(protect=r.protect),
        )
        for r in run.resources
    }
    for r in run.resources:
        shaped[(r.type, r.name)].parent = shaped.get((r.parent_type or "", r.parent or ""))
    return list(shaped.values())


def _mask(value: Any, made: dict[str, Any], found: list[Any]) -> Any:
    """``value`` with every string that holds a not-yet-known id or ARN replaced by the unknown sentinel
    (a string computed from an unknown is unknown as a whole); what it came from is added to ``found``."""
    if isinstance(value, dict):
        return {k: _mask(v, made, found) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, made, found) for v in value]
    if isinstance(value, str):
        sources = [other for made_value, other in made.items() if made_value in value]
        found.extend(sources)
        return UNKNOWN_STRING if sources else value
    return value


def as_preview(resources: list[PolicyResourceShape]) -> list[PolicyResourceShape]:
    """The same resources as a first ``pulumi preview`` sees them: every id and ARN unknown, and so every
    value computed from one, with the engine's property dependencies naming the resources it comes from."""
    made = {}
    for r in resources:
        for key in ("id", "arn"):
            value = r.props.get(key)
            if isinstance(value, str) and len(value) >= 8:
                made[value] = r
    fresh: dict[int, PolicyResourceShape] = {}
    for r in resources:
        props, deps = {}, {}
        for key, value in r.props.items():
            if key in ("id", "arn"):
                props[key] = UNKNOWN_STRING
                continue
            sources: list[PolicyResourceShape] = []
            props[key] = _mask(value, {v: o for v, o in made.items() if o is not r}, sources)
            if sources:
                deps[key] = list({id(s): s for s in sources}.values())
        fresh[id(r)] = replace(r, props=props, property_dependencies=deps)
    for r in resources:
        copy = fresh[id(r)]
        copy.parent = fresh[id(r.parent)] if r.parent is not None else None
        copy.property_dependencies = {
            key: [fresh[id(d)] for d in deps] for key, deps in copy.property_dependencies.items()
        }
    return [fresh[id(r)] for r in resources]


def violations(resources: list[PolicyResourceShape]) -> list[tuple[str, str, str | None]]:
    """(policy, message, urn) for every violation every policy of the pack reports."""
    found: list[tuple[str, str, str | None]] = []
    for policy in policies().STACK_POLICIES:

        def report(message: str, urn: str | None = None, name: str = policy.name) -> None:
            found.append((name, message, urn))

        policy.validate(SimpleNamespace(resources=resources), report)
    return found
