"""The CrossGuard policy pack (policy/): the audit's rules as `pulumi preview --policy-pack policy` runs them.

The pack's validate functions are called directly with the stacks' resources shaped as pulumi-policy hands
them over (tests/crossguard.py): the shipped stacks pass, on their first preview too, when ids and ARNs are
not known yet; tests/test_audit.py runs every bad program through the pack as well.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from crossguard import as_preview, policies, policy_resources, violations

from stacks.audit import RULES
from stacks.plan import Plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["dev", "prod-data", "prod-compute"])
def plan(request: pytest.FixtureRequest, shipped_plan: Callable[[str], Plan]) -> Plan:
    return shipped_plan(request.param)


def test_the_pack_has_one_policy_per_audit_rule() -> None:
    names = [p.name for p in policies().STACK_POLICIES]
    assert names[: len(RULES)] == [rule.name for rule in RULES]
    assert names[len(RULES) :] == ["tessera-stack-settings"]
    assert len(set(names)) == len(names)
    assert all(p.description for p in policies().STACK_POLICIES)
    # The pack runs the audit's own functions, not copies of them.
    assert [p.rule.check for p in policies().STACK_POLICIES[: len(RULES)]] == [rule.check for rule in RULES]


def test_the_shipped_stacks_pass_the_pack(plan: Plan) -> None:
    assert violations(policy_resources(plan.run, plan.stack)) == []


def test_a_first_preview_of_the_shipped_stacks_passes_the_pack(plan: Plan) -> None:
    # Ids and ARNs are unknown until the resources exist: no rule may mistake that for a violation.
    preview = as_preview(policy_resources(plan.run, plan.stack))
    unknown = [
        r for r in preview if r.resource_type == "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
    ]
    assert unknown and all(r.property_dependencies.get("securityGroupId") for r in unknown)
    assert violations(preview) == []


@pytest.mark.parametrize("stack", ["dev", "prod-compute"])
def test_an_unknown_group_is_followed_to_the_jump_host(
    stack: str, shipped_plan: Callable[[str], Plan]
) -> None:
    resources = policy_resources(shipped_plan(stack).run, stack)
    (ssh, *_) = [r for r in resources if r.name.endswith("-ssh-0")]
    ssh.props["cidrIpv4"] = "0.0.0.0/0"
    found = [message for _, message, _ in violations(as_preview(resources))]
    # Reported as the jump host's SSH, so the rule found the jump host's group through the dependency.
    assert any("jump host SSH open to 0.0.0.0/0" in m for m in found), found


def test_a_stack_without_its_settings_is_a_violation(plan: Plan) -> None:
    resources = policy_resources(plan.run, "no-such-stack")
    found = [(policy, message) for policy, message, _ in violations(resources)]
    assert (
        "tessera-stack-settings",
        "[settings] stack no-such-stack: no Pulumi.no-such-stack.yaml beside "
        "Pulumi.yaml: the rules need the stack's settings",
    ) in found


def test_violations_name_the_resource_urn(dev: Plan) -> None:
    resources = policy_resources(dev.run, "dev")
    (policy,) = [r for r in resources if r.name == "tessera-s3-imagery-policy"]
    policy.props["policy"] = '{"Statement": []}'
    found = violations(resources)
    assert [(p, u) for p, m, u in found if "TLS" in m] == [
        ("tessera-buckets", "urn:pulumi:dev::tessera::aws:s3/bucket:Bucket::tessera-s3-imagery")
    ]


def test_main_builds_a_mandatory_pack_of_every_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    # PolicyPack serves and blocks: stand in for pulumi-policy and record what __main__ builds.
    built: dict[str, Any] = {}
    stub = ModuleType("pulumi_policy")
    stub.EnforcementLevel = SimpleNamespace(MANDATORY="mandatory")  # type: ignore[attr-defined]
    stub.StackValidationPolicy = SimpleNamespace  # type: ignore[attr-defined]
    stub.PolicyPack = lambda **kwargs: built.update(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pulumi_policy", stub)
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(ROOT / "policy" / "__main__.py"), run_name="__main__")
    assert built["name"] == "tessera" and built["enforcement_level"] == "mandatory"
    names = [p.name for p in built["policies"]]
    assert names == [p.name for p in policies().STACK_POLICIES]
    assert all(callable(p.validate) and p.description for p in built["policies"])


@pytest.mark.parametrize("preview", [False, True], ids=["known", "first-preview"])
def test_the_real_sdk_runs_the_policies_on_dev(preview: bool, dev: Plan) -> None:
    # With pulumi-policy installed: its own classes, and props behind its proxies that raise on unknowns.
    sdk = pytest.importorskip("pulumi_policy")
    from pulumi_policy.proxy import unknown_checking_proxy

    shaped = policy_resources(dev.run, "dev")
    shaped = as_preview(shaped) if preview else shaped
    real = {
        id(r): sdk.PolicyResource(
            r.resource_type, unknown_checking_proxy(r.props), r.urn, r.name, r.opts, None, None, [], {}
        )
        for r in shaped
    }
    for r in shaped:
        real[id(r)].parent = real[id(r.parent)] if r.parent is not None else None
        real[id(r)].property_dependencies = {
            key: [real[id(d)] for d in deps] for key, deps in r.property_dependencies.items()
        }
    found: list[str] = []
    for policy in policies().STACK_POLICIES:
        sdk_policy = sdk.StackValidationPolicy(
            name=policy.name, description=policy.description, validate=policy.validate
        )
        sdk_policy.validate(sdk.StackValidationArgs(list(real.values())), lambda m, urn=None: found.append(m))
    assert found == []
