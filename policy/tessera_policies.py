"""The tessera CrossGuard policies: every rule of stacks/audit.py as one stack validation policy.

The rules are the functions the offline audit runs (``tessera plan``, the tests); here they read the stack's
resources as the engine hands them to a stack policy (``args.resources``, pulumi-policy ``PolicyResource`` s),
turned into the same records by :func:`stacks.audit.records_from_policy`. This module does not import
pulumi-policy, and builds no ``PolicyPack`` (which starts a server and blocks): ``__main__.py`` does, so the
validate functions here can be called directly.

The stack's settings (is it a throw-away stack, which addresses may reach the jump host) come from its
``Pulumi.<stack>.yaml`` beside ``Pulumi.yaml``, the file ``pulumi preview`` reads; the stack's name comes from
the resources' URNs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from stacks.audit import RULES, Context, Record, Rule, records_from_policy  # noqa: E402
from stacks.offline import load_stack_config  # noqa: E402
from stacks.settings import ConfigError, Settings, getter_from_mapping, read_settings  # noqa: E402

#: ``report_violation(message, urn)``: what a stack validation reports through.
ReportViolation = Callable[[str, "str | None"], None]

#: Where a value is a credential the program fetches at deploy time, never one written in it: the ECR login
#: token infra/registry.py reads with ``aws.ecr.get_authorization_token`` for the image push.
DEPLOY_TIME_CREDENTIALS = (("docker:index/image:Image", "registry", "password"),)


def stack_of(urn: str) -> str | None:
    """The stack named in a URN (``urn:pulumi:<stack>::<project>::<type>::<name>``)."""
    parts = urn.split("::")
    head = parts[0].split(":")
    return head[2] if len(parts) > 1 and len(head) == 3 and head[:2] == ["urn", "pulumi"] else None


def stack_settings(stack: str, project_dir: Path = REPO_ROOT) -> Settings:
    """The settings ``tessera plan`` reads for ``stack``, from ``Pulumi.<stack>.yaml``."""
    from infra.training import ACCELERATOR_FAMILIES

    path = project_dir / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise ConfigError(f"no {path.name} beside Pulumi.yaml: the rules need the stack's settings")
    config = load_stack_config(str(path))
    return read_settings(getter_from_mapping(config), stack, accelerator_families=ACCELERATOR_FAMILIES)


def deploy_time_values(records: Sequence[Record]) -> frozenset[str]:
    """The credentials in ``records`` that are fetched at deploy time (:data:`DEPLOY_TIME_CREDENTIALS`)."""
    values = set()
    for type_token, block, key in DEPLOY_TIME_CREDENTIALS:
        for r in records:
            if r.type == type_token and isinstance(r.get(block), dict):
                value = r.get(block).get(key)
                if isinstance(value, str):
                    values.add(value)
    return frozenset(values)


def context_for(records: Sequence[Record], project_dir: Path = REPO_ROOT) -> tuple[Context, str | None]:
    """The rules' context for a stack's records, and why its settings could not be read (None: they were)."""
    stack = next((s for s in (stack_of(r.urn) for r in records) if s), None)
    fetched = deploy_time_values(records)
    if stack is None:
        return Context(None, fetched), "no resource URN names the stack"
    try:
        return Context(stack_settings(stack, project_dir), fetched), None
    except (ConfigError, OSError, ValueError) as error:
        return Context(None, fetched), f"stack {stack}: {error}"


@dataclass(frozen=True)
class StackPolicy:
    """One stack validation: a rule of stacks/audit.py over the stack's resources."""

    name: str
    description: str
    rule: Rule | None = None
    project_dir: Path = REPO_ROOT

    def validate(self, args: Any, report_violation: ReportViolation) -> None:
        """A pulumi-policy ``StackValidationPolicy``'s ``validate``: ``args.resources`` in, violations out."""
        records = records_from_policy(args.resources)
        context, problem = context_for(records, self.project_dir)
        if self.rule is None:
            if problem is not None:
                report_violation(f"[settings] {problem}", None)
            return
        for finding in self.rule.check(records, context):
            report_violation(str(finding), finding.urn or None)


#: One policy per rule, and one that the stack's settings can be read (without them the lifecycle rules
#: would treat a production stack as a throw-away one).
STACK_POLICIES: tuple[StackPolicy, ...] = (
    *(StackPolicy(rule.name, rule.description, rule) for rule in RULES),
    StackPolicy(
        "tessera-stack-settings",
        "The stack's Pulumi.<stack>.yaml is beside Pulumi.yaml and valid: the rules read its settings.",
    ),
)
