"""`tessera plan`: what `pulumi up` would create for a stack, and what it would cost — offline.

The stack's own program runs under Pulumi's mocks with the stack's config file, so the plan is exactly the
program `pulumi up` runs, minus AWS. A compute-layer stack reads the data layer through a StackReference; the
plan answers it by planning the data stack first, when its config file is beside this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacks.audit import Finding, audit
from stacks.capacity import capacity_warnings
from stacks.cost import CostEstimate, estimate
from stacks.graph import graph_findings
from stacks.offline import Declared, OfflineRun, load_stack_config, run_offline
from stacks.settings import ConfigError, Settings, getter_from_mapping, read_settings

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The settings worth showing per resource type (engine keys).
KEY_SETTINGS: dict[str, tuple[str, ...]] = {
    "aws:ec2/vpc:Vpc": ("cidrBlock",),
    "aws:ec2/subnet:Subnet": ("cidrBlock", "availabilityZone", "mapPublicIpOnLaunch"),
    "aws:ec2/instance:Instance": ("instanceType", "instanceInitiatedShutdownBehavior"),
    "aws:ec2/launchTemplate:LaunchTemplate": ("instanceType",),
    "aws:autoscaling/group:Group": ("minSize", "maxSize"),
    "aws:rds/instance:Instance": (
        "engine",
        "engineVersion",
        "instanceClass",
        "multiAz",
        "storageEncrypted",
        "publiclyAccessible",
        "deletionProtection",
    ),
    "aws:sqs/queue:Queue": ("visibilityTimeoutSeconds", "messageRetentionSeconds"),
    "aws:s3/bucketVersioning:BucketVersioning": ("versioningConfiguration",),
    "aws:ebs/volume:Volume": ("size", "type", "encrypted"),
    "aws:cloudwatch/metricAlarm:MetricAlarm": ("metricName", "threshold", "evaluationPeriods"),
    "aws:cloudwatch/logGroup:LogGroup": ("name", "retentionInDays"),
    "aws:ecr/repository:Repository": ("imageTagMutability",),
    "aws:kms/key:Key": ("enableKeyRotation",),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("ipProtocol", "fromPort", "cidrIpv4"),
    "docker:index/image:Image": ("imageName",),
}


@dataclass
class Plan:
    """One stack's offline plan: its resources, outputs and cost."""

    stack: str
    settings: Settings
    run: OfflineRun
    cost: CostEstimate
    findings: list[Finding]
    #: What may stop a real ``pulumi up`` that mocks cannot see: offerings per zone, vCPU quotas.
    warnings: list[str] = field(default_factory=list)

    @property
    def layer(self) -> str:
        """Which layer the stack holds."""
        return self.settings.layer


def config_path(stack: str, project_dir: Path = REPO_ROOT) -> Path:
    """``Pulumi.<stack>.yaml`` in the project directory."""
    return project_dir / f"Pulumi.{stack}.yaml"


def _program() -> dict[str, Any]:
    from stacks.program import build, settings_from_pulumi

    return build(settings_from_pulumi())


def plan_stack(stack: str, project_dir: Path = REPO_ROOT, config: dict[str, Any] | None = None) -> Plan:
    """Run the stack's program offline and price it. ``config`` replaces the stack file when given."""
    path = config_path(stack, project_dir)
    if config is None:
        if not path.exists():
            known = sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in project_dir.glob("Pulumi.*.yaml"))
            raise ConfigError(
                f"no config file {path.name} for stack {stack!r}; stacks here: {', '.join(known) or 'none'} "
                f"(create one with `pulumi stack init {stack}` and `pulumi config set ...`)"
            )
        config = load_stack_config(str(path))
    from infra.training import ACCELERATOR_FAMILIES

    # Validate before running anything, so a bad value reads as one clear message.
    settings = read_settings(getter_from_mapping(config), stack, accelerator_families=ACCELERATOR_FAMILIES)
    stack_outputs: dict[str, Any] | None = None
    data_run: OfflineRun | None = None
    if settings.layer == "compute" and config.get("tessera:dataStack"):
        data_stack = str(config["tessera:dataStack"]).rsplit("/", 1)[-1]
        if not config_path(data_stack, project_dir).exists():
            raise ConfigError(
                f"tessera:dataStack names {config['tessera:dataStack']!r}, but {data_stack}'s config file "
                f"Pulumi.{data_stack}.yaml is not here; the plan of a compute stack needs its data stack's"
            )
        data_run = plan_stack(data_stack, project_dir).run
        stack_outputs = data_run.outputs
    try:
        run = run_offline(_program, config=config, stack=stack, stack_outputs=stack_outputs)
    except Exception as exc:
        # A setting checked inside an Output (one that needs the data stack's values) reaches here wrapped
        # in the engine's "While processing resource ..." errors: show the user the message, not the chain.
        cause = _setting_error(exc)
        if cause is None:
            raise
        raise ConfigError(str(cause)) from None
    return Plan(
        stack=stack,
        settings=settings,
        run=run,
        cost=estimate(run),
        findings=audit(run, settings) + graph_findings(run, data_run),
        warnings=capacity_warnings(settings),
    )


def _setting_error(exc: BaseException) -> BaseException | None:
    """The first error in ``exc``'s chain of causes that names a setting to fix, if any."""
    from infra.instances import NotOfferedError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError | NotOfferedError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def short_type(type_token: str) -> str:
    """``aws:rds/instance:Instance`` -> ``rds.Instance``; ``docker:index/image:Image`` -> ``docker.Image``."""
    package, module_path, kind = [*type_token.split(":"), "", ""][:3]
    module = module_path.split("/")[0]
    return f"{package if module == 'index' else module}.{kind}"


def key_settings(resource: Declared) -> str:
    """A short summary of the settings that matter for one resource."""
    parts = []
    for key in KEY_SETTINGS.get(resource.type, ()):
        value = resource.inputs.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # the engine hands numbers over as floats
        elif isinstance(value, dict | list):
            value = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={value}")
    if resource.protect:
        parts.append("protected")
    return " ".join(parts)


def render(plan: Plan, width: int | None = None) -> str:
    """The plan as text: a resource table with key settings and cost, then the totals."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    prices = plan.cost.prices
    hours = prices.hours_per_month
    table = Table(title=f"tessera plan — stack {plan.stack} (layer {plan.layer})", show_lines=False)
    for column in ("layer", "type", "name", "key settings", "$/h", "$/month", "note"):
        table.add_column(column, overflow="fold", justify="right" if column.startswith("$") else "left")
    for line in sorted(plan.cost.lines, key=lambda c: (c.layer, c.resource.type, c.resource.name)):
        r = line.resource
        monthly = line.monthly(hours)
        table.add_row(
            line.layer,
            short_type(r.type),
            r.name,
            key_settings(r),
            f"{monthly / hours:.3f}" if monthly else "",
            f"{monthly:,.2f}" if monthly else "",
            line.note,
        )
    buffer = StringIO()
    console = Console(file=buffer, width=width or 200, force_terminal=False, color_system=None)
    console.print(table)
    est = plan.cost
    console.print(f"{sum(1 for _ in plan.run.custom_resources())} resources.")
    console.print(
        f"Everything running (fleets at max size): ${est.total_hourly():,.2f}/h, "
        f"${est.total_monthly():,.2f}/month"
    )
    console.print(
        f"Compute destroyed (data layer only):     ${est.total_hourly(('data',)):,.2f}/h, "
        f"${est.total_monthly(('data',)):,.2f}/month"
    )
    if plan.layer == "compute":
        console.print("This stack holds compute only: its data layer is priced with its own stack.")
    if plan.settings.region != prices.region:
        console.print(f"Prices are for {prices.region}; {plan.settings.region} differs by a few percent.")
    if est.unpriced:
        console.print(f"Not priced (add them to stacks/prices.toml): {', '.join(est.unpriced)}")
    console.print(
        f"Prices: {prices.source}, recorded {prices.recorded}; usage-based charges (S3, SQS, transfer, logs) "
        "are not included."
    )
    if plan.findings:
        console.print(f"Security and lifecycle checks: {len(plan.findings)} finding(s):")
        for finding in plan.findings:
            console.print(f"  {finding}")
    else:
        console.print("Security and lifecycle checks: no findings.")
    if plan.warnings:
        console.print(f"Before `pulumi up` on a real account: {len(plan.warnings)} warning(s):")
        for warning in plan.warnings:
            console.print(f"  - {warning}")
    outputs = plan.run.outputs
    if "grafanaTunnelCommand" in outputs:
        # The mocks' addresses are placeholders: the real command is made from the deployed stack's outputs.
        reach = "`tessera tunnel grafana` (then http://localhost:3000)"
        if "catalogTunnelCommand" in outputs:
            reach += ", `tessera tunnel catalog` (then http://localhost:8080)"
        console.print(
            f"Once deployed: {reach}, through the jump host; add --print for the ssh command. Addresses in "
            "this offline plan are simulated (the mocks'), not your stack's."
        )
    return buffer.getvalue()
