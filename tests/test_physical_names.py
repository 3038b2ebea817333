"""dev, prod-data and prod-compute live in one AWS account and region without claiming one physical name.

Many AWS names are unique per account and region (KMS aliases, log groups, RDS identifiers, SSM parameters,
key pairs...) or per account (IAM) or worldwide (S3 buckets). A `pulumi up` of a second stack whose program
spells such a name the same way fails with AlreadyExists. Each stack's program runs here under mocks, every
physical name it declares is collected per namespace, and no two resources, in one stack or across the
three, may claim the same one. A name the program spells out must carry its stack, the same way everywhere:
``/tessera/<stack>/...`` for path-like names (log groups, SSM parameters), ``tessera-<stack>-...`` otherwise
(``alias/tessera-<stack>-...`` for KMS aliases; a path AWS chooses, such as
``/aws/rds/instance/tessera-<stack>-db/...``, through the resource it belongs to). A name left to Pulumi's
auto-naming gets a random suffix from the engine and cannot collide.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from stacks.offline import Declared
from stacks.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
STACKS = ("dev", "prod-data", "prod-compute")

#: Resource type -> (input that names it, namespace the name must be unique in). Namespaces are per account
#: (and region): every stack here deploys to one account and region, so one namespace covers all three.
ACCOUNT_UNIQUE: dict[str, tuple[tuple[str, str], ...]] = {
    "aws:kms/alias:Alias": (("name", "kms alias"),),
    "aws:cloudwatch/logGroup:LogGroup": (("name", "log group"),),
    "aws:ssm/parameter:Parameter": (("name", "ssm parameter"),),
    "aws:ec2/keyPair:KeyPair": (("keyName", "key pair"),),
    "aws:rds/instance:Instance": (
        ("identifier", "rds instance"),
        ("finalSnapshotIdentifier", "rds snapshot"),
    ),
    "aws:rds/subnetGroup:SubnetGroup": (("name", "rds subnet group"),),
    "aws:rds/parameterGroup:ParameterGroup": (("name", "rds parameter group"),),
    "aws:s3/bucket:Bucket": (("bucket", "s3 bucket"),),
    "aws:s3/bucketV2:BucketV2": (("bucket", "s3 bucket"),),
    "aws:sqs/queue:Queue": (("name", "sqs queue"),),
    "aws:sns/topic:Topic": (("name", "sns topic"),),
    "aws:ecr/repository:Repository": (("name", "ecr repository"),),
    "aws:secretsmanager/secret:Secret": (("name", "secret"),),
    "aws:iam/role:Role": (("name", "iam role"),),
    "aws:iam/policy:Policy": (("name", "iam policy"),),
    "aws:iam/instanceProfile:InstanceProfile": (("name", "iam instance profile"),),
    "aws:iam/user:User": (("name", "iam user"),),
    "aws:lambda/function:Function": (("name", "lambda function"),),
    "aws:autoscaling/group:Group": (("name", "autoscaling group"),),
    "aws:ec2/launchTemplate:LaunchTemplate": (("name", "launch template"),),
    "aws:ec2/securityGroup:SecurityGroup": (("name", "security group"),),
    "aws:cloudwatch/metricAlarm:MetricAlarm": (("name", "cloudwatch alarm"),),
    "aws:cloudwatch/eventRule:EventRule": (("name", "eventbridge rule"),),
    "aws:cloudwatch/dashboard:Dashboard": (("dashboardName", "cloudwatch dashboard"),),
}
#: Types whose ``name`` input is scoped to a parent resource (a role's inline policy, a group's scaling
#: policy) or is not a physical name at all: they cannot collide across stacks.
SCOPED_NAMES = frozenset(
    {
        "aws:iam/rolePolicy:RolePolicy",
        "aws:autoscaling/policy:Policy",
        "docker:index/image:Image",
        "pulumi:pulumi:StackReference",
        "pulumi:providers:aws",
        "pulumi:providers:docker",
    }
)
#: Namespaces whose names are paths: the stack is the second segment, ``/tessera/<stack>/``.
PATH_NAMESPACES = frozenset({"log group", "ssm parameter"})
#: Where AWS, not the program, chooses the path (``/aws/rds/instance/<identifier>/postgresql``).
AWS_CHOSEN = "/aws/"


@pytest.fixture
def plans(shipped_plan: Callable[[str], Plan]) -> dict[str, Plan]:
    return {stack: shipped_plan(stack) for stack in STACKS}


def explicit_names(resource: Declared) -> list[tuple[str, str]]:
    """(namespace, name) for every physical name ``resource`` spells out; auto-named ones give none."""
    names = []
    for key, namespace in ACCOUNT_UNIQUE.get(resource.type, ()):
        value = resource.inputs.get(key)
        if isinstance(value, str) and value:
            names.append((namespace, value))
    return names


def claims(plans: dict[str, Plan]) -> dict[tuple[str, str], list[str]]:
    """(namespace, name) -> every ``stack: type name`` that declares it."""
    claimed: dict[tuple[str, str], list[str]] = defaultdict(list)
    for stack, plan in plans.items():
        for r in plan.run.custom_resources():
            for key in explicit_names(r):
                claimed[key].append(f"{stack}: {r.type} {r.name}")
    return claimed


def test_no_two_resources_claim_one_physical_name(plans: dict[str, Plan]) -> None:
    # A type the tables do not know, with a name of its own, may be account-unique: classify it above.
    unclassified = sorted(
        {
            r.type
            for plan in plans.values()
            for r in plan.run.custom_resources()
            if r.type not in ACCOUNT_UNIQUE
            and r.type not in SCOPED_NAMES
            and any(isinstance(r.inputs.get(k), str) for k in ("name", "namePrefix", "identifier"))
        }
    )
    assert unclassified == [], "types with a name input: add them to ACCOUNT_UNIQUE or SCOPED_NAMES"
    claimed = claims(plans)
    # Not vacuous: the program spells out names of these kinds in every layer.
    assert {namespace for namespace, _ in claimed} >= {"kms alias", "log group", "ssm parameter", "key pair"}
    collisions = {f"{ns} {name!r}": who for (ns, name), who in claimed.items() if len(who) > 1}
    assert collisions == {}, "one account and region would refuse the second `pulumi up`"


def test_every_spelled_out_name_carries_its_stack(plans: dict[str, Plan]) -> None:
    wrong = []
    for stack, plan in plans.items():
        for r in plan.run.custom_resources():
            for namespace, name in explicit_names(r):
                if namespace in PATH_NAMESPACES and name.startswith(AWS_CHOSEN):
                    # A path AWS chooses (RDS log exports) carries the stack in the resource it belongs to.
                    ok = f"/tessera-{stack}-" in name
                    form = f"{AWS_CHOSEN}.../tessera-{stack}-.../..."
                elif namespace in PATH_NAMESPACES:
                    ok = name.startswith(f"/tessera/{stack}/")
                    form = f"/tessera/{stack}/..."
                elif namespace == "kms alias":
                    ok = name.startswith(f"alias/tessera-{stack}-")
                    form = f"alias/tessera-{stack}-..."
                else:
                    ok = name.startswith(f"tessera-{stack}-")
                    form = f"tessera-{stack}-..."
                if not ok:
                    wrong.append(f"{stack}: {r.type} {r.name} names {namespace} {name!r}, not {form}")
    assert wrong == []
