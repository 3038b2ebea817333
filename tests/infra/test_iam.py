"""Service roles: who may assume them, and that each grants exactly the resources its access lists."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pulumi_aws as aws
import pytest

from infra.iam import BucketGrant, ServiceAccess, ServiceRole, ServiceRoleArgs, wildcard_violations
from stacks.offline import OfflineRun

ROLE = "aws:iam/role:Role"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
PROFILE = "aws:iam/instanceProfile:InstanceProfile"

BUCKET = "arn:aws:s3:::tessera-imagery"
MODELS = "arn:aws:s3:::tessera-models"
RESULTS = "arn:aws:s3:::tessera-results"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf"
KEY = "arn:aws:kms:us-east-1:123456789012:key/1111-2222"
LOG_GROUP = "arn:aws:logs:us-east-1:123456789012:log-group:/tessera/dev/model-runner"


def _policy(run: OfflineRun, name: str) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(run.named(ROLE_POLICY, name).inputs["policy"])
    return policy


def _actions(policy: dict[str, Any]) -> set[str]:
    return {a for s in policy["Statement"] for a in s["Action"]}


def _statement(policy: dict[str, Any], sid: str) -> dict[str, Any]:
    (found,) = [s for s in policy["Statement"] if s["Sid"] == sid]
    return found


def _model_runner(offline: Callable[..., OfflineRun], **role: Any) -> tuple[OfflineRun, dict[str, str]]:
    """A model-runner role over real (mocked) queues and a repository, so ARNs arrive as Outputs."""

    def program() -> dict[str, Any]:
        requests = aws.sqs.Queue("image-requests")
        regions = aws.sqs.Queue("region-requests")
        repo = aws.ecr.Repository("model-runner")
        access = ServiceAccess(
            consume_queue_arns=[requests.arn, regions.arn],
            send_queue_arns=[regions.arn],
            read_buckets=[BucketGrant(BUCKET), BucketGrant(MODELS, "models/")],
            write_buckets=[BucketGrant(RESULTS, "results/")],
            secret_arns=[SECRET],
            kms_key_arns=[KEY],
            ecr_repository_arns=[repo.arn],
            log_group_arns=[LOG_GROUP],
            metrics_namespaces=["tessera/Workers"],
        )
        r = ServiceRole("mr", ServiceRoleArgs(service="model-runner", access=access, **role))
        return {
            "requests": requests.arn,
            "regions": regions.arn,
            "repo": repo.arn,
            "role_arn": r.role_arn,
            "role_name": r.role_name,
            "profile": r.instance_profile_name,
        }

    run = offline(program)
    given = {k: run.outputs[k] for k in ("requests", "regions", "repo")}
    assert all(v.startswith("arn:aws:") for v in given.values())  # resolved, not None
    return run, given


def test_policy_names_only_the_given_resources(offline: Callable[..., OfflineRun]) -> None:
    run, given = _model_runner(offline)
    policy = _policy(run, "mr-policy")
    allowed = {
        given["requests"],
        given["regions"],
        given["repo"],
        f"{BUCKET}/*",
        BUCKET,
        f"{MODELS}/models/*",
        MODELS,
        f"{RESULTS}/results/*",
        SECRET,
        KEY,
        f"{LOG_GROUP}:*",
        "*",
    }
    named = {
        r
        for s in policy["Statement"]
        for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
    }
    assert named == allowed  # every given ARN appears, and nothing else does
    assert wildcard_violations(policy) == []  # the "*" above is only on the actions AWS cannot scope


def test_each_use_gets_only_its_actions(offline: Callable[..., OfflineRun]) -> None:
    run, given = _model_runner(offline)
    policy = _policy(run, "mr-policy")
    consume = _statement(policy, "ConsumeQueues")
    assert set(consume["Action"]) == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
    }
    assert consume["Resource"] == [given["requests"], given["regions"]]
    send = _statement(policy, "SendToQueues")
    assert set(send["Action"]) == {"sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"}
    assert send["Resource"] == [given["regions"]]  # may send to the region queue, never to image requests
    # Writing results grants no reading of them, and reading grants no writing.
    assert _statement(policy, "WriteObjects")["Resource"] == [f"{RESULTS}/results/*"]
    assert set(_statement(policy, "WriteObjects")["Action"]) == {"s3:PutObject", "s3:AbortMultipartUpload"}
    assert _statement(policy, "ReadObjects")["Action"] == ["s3:GetObject"]
    assert f"{RESULTS}/results/*" not in _statement(policy, "ReadObjects")["Resource"]
    assert "s3:DeleteObject" not in _actions(policy)
    logs = _statement(policy, "WriteLogs")
    assert logs["Resource"] == [f"{LOG_GROUP}:*"]
    assert "logs:CreateLogGroup" not in logs["Action"]


def test_listing_is_limited_to_the_granted_prefix(offline: Callable[..., OfflineRun]) -> None:
    run, _ = _model_runner(offline)
    policy = _policy(run, "mr-policy")
    lists = [s for s in policy["Statement"] if s["Action"] == ["s3:ListBucket"]]
    by_bucket = {s["Resource"][0]: s for s in lists}
    assert set(by_bucket) == {BUCKET, MODELS}  # write-only buckets cannot be listed
    assert by_bucket[MODELS]["Condition"] == {"StringLike": {"s3:prefix": ["models/*"]}}
    assert "Condition" not in by_bucket[BUCKET]  # a whole-bucket grant


def test_unscopable_actions_carry_their_limits(offline: Callable[..., OfflineRun]) -> None:
    run, _ = _model_runner(offline)
    policy = _policy(run, "mr-policy")
    metrics = _statement(policy, "PutMetrics")
    assert metrics["Action"] == ["cloudwatch:PutMetricData"]
    assert metrics["Condition"] == {"StringEquals": {"cloudwatch:namespace": ["tessera/Workers"]}}
    assert _statement(policy, "EcrLogin") == {
        "Sid": "EcrLogin",
        "Effect": "Allow",
        "Action": ["ecr:GetAuthorizationToken"],
        "Resource": "*",
    }


def test_every_statement_has_a_unique_sid(offline: Callable[..., OfflineRun]) -> None:
    run, _ = _model_runner(offline)
    sids = [s.get("Sid") for s in _policy(run, "mr-policy")["Statement"]]
    assert all(sids)
    assert len(sids) == len(set(sids))


def test_trust_is_only_the_given_service(offline: Callable[..., OfflineRun]) -> None:
    run, _ = _model_runner(offline, trusted_service="lambda.amazonaws.com", max_session_duration_s=7200)
    role = run.named(ROLE, "mr-role")
    trust = json.loads(role.inputs["assumeRolePolicy"])
    assert trust["Statement"] == [
        {
            "Sid": "TrustedService",
            "Effect": "Allow",
            "Principal": {"Service": "lambda.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ]
    assert role.inputs["maxSessionDuration"] == 7200
    assert "managedPolicyArns" not in role.inputs
    # The one inline policy is attached to this role, and the profile wraps this role.
    assert run.named(ROLE_POLICY, "mr-policy").inputs["role"] == role.outputs["name"]
    assert run.named(PROFILE, "mr-profile").inputs["role"] == role.outputs["name"]
    assert run.outputs["profile"] == run.named(PROFILE, "mr-profile").outputs["name"]
    assert run.outputs["role_arn"] == role.outputs["arn"]


def test_default_trust_is_ec2(offline: Callable[..., OfflineRun]) -> None:
    run, _ = _model_runner(offline)
    trust = json.loads(run.named(ROLE, "mr-role").inputs["assumeRolePolicy"])
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]


def test_a_role_without_queues_has_no_sqs_actions(offline: Callable[..., OfflineRun]) -> None:
    def program() -> dict[str, Any]:
        access = ServiceAccess(write_buckets=[BucketGrant(RESULTS, "sky/")], kms_key_arns=[KEY])
        role = ServiceRole("sky", ServiceRoleArgs(service="sky-generator", access=access))
        return {"policy": role.policy_json}

    run = offline(program)
    policy = _policy(run, "sky-policy")
    assert _actions(policy)  # not vacuous: the role does have a policy
    assert not [a for a in _actions(policy) if a.lower().startswith("sqs:")]
    assert not [a for a in _actions(policy) if a.lower().startswith(("secretsmanager:", "ecr:"))]


def test_grafana_reads_cloudwatch_without_wildcard_violations(offline: Callable[..., OfflineRun]) -> None:
    def program() -> dict[str, Any]:
        access = ServiceAccess(cloudwatch_read=True, log_group_arns=[LOG_GROUP])
        role = ServiceRole("grafana", ServiceRoleArgs(service="grafana", access=access))
        return {"policy": role.policy_json}

    run = offline(program)
    policy = _policy(run, "grafana-policy")
    read = _statement(policy, "ReadCloudWatch")
    assert read["Resource"] == "*"
    assert set(read["Action"]) == {
        "cloudwatch:GetMetricData",
        "cloudwatch:ListMetrics",
        "cloudwatch:GetMetricStatistics",
        "cloudwatch:DescribeAlarms",
    }
    assert wildcard_violations(policy) == []
    assert json.loads(run.outputs["policy"]) == policy


def test_extra_statements_pass_through(offline: Callable[..., OfflineRun]) -> None:
    extra = {
        "Sid": "DescribeOwnInstances",
        "Effect": "Allow",
        "Action": ["ec2:DescribeInstances"],
        "Resource": "*",
    }

    def program() -> dict[str, Any]:
        role = ServiceRole(
            "t", ServiceRoleArgs(service="trainer", access=ServiceAccess(extra_statements=[extra]))
        )
        return {"policy": role.policy_json}

    run = offline(program)
    assert _policy(run, "t-policy")["Statement"] == [extra]
    assert wildcard_violations(_policy(run, "t-policy")) == []


def test_nothing_to_touch_means_no_policy_and_no_profile_when_asked(
    offline: Callable[..., OfflineRun],
) -> None:
    def program() -> dict[str, Any]:
        role = ServiceRole(
            "bare", ServiceRoleArgs(service="api", access=ServiceAccess(), instance_profile=False)
        )
        assert role.instance_profile_name is None
        assert role.policy_json is None
        return {"arn": role.role_arn}

    run = offline(program)
    assert run.of_type(ROLE_POLICY) == []  # IAM refuses a policy with no statements
    assert run.of_type(PROFILE) == []
    assert run.outputs["arn"].startswith("arn:aws:iam::")


def test_children_belong_to_the_component(offline: Callable[..., OfflineRun]) -> None:
    run, _ = _model_runner(offline)
    for token in (ROLE, ROLE_POLICY, PROFILE):
        assert [r.parent for r in run.of_type(token)] == ["mr"]


def test_bad_args_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_session_duration_s"):
        ServiceRoleArgs(service="x", access=ServiceAccess(), max_session_duration_s=60)
    with pytest.raises(ValueError, match="Sid"):
        ServiceAccess(extra_statements=[{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": BUCKET}])
    with pytest.raises(ValueError, match="drop it"):
        BucketGrant(BUCKET, "/models/")


# --- wildcard_violations, on policies written by hand ----------------------------------------------------


def _doc(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _allow(sid: str, action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource, **extra}


GOOD = [
    _allow("Login", "ecr:GetAuthorizationToken", "*"),
    _allow("Describe", ["ec2:DescribeInstances", "ec2:DescribeRegions"], "*"),
    _allow(
        "Metrics",
        "cloudwatch:PutMetricData",
        "*",
        Condition={"StringEquals": {"cloudwatch:namespace": "tessera"}},
    ),
    _allow("Read", ["cloudwatch:GetMetricData", "cloudwatch:ListMetrics"], "*"),
    _allow("Objects", ["s3:GetObject"], [f"{BUCKET}/*"]),
    {"Sid": "NoDeletes", "Effect": "Deny", "Action": "s3:*", "Resource": "*"},
]


@pytest.mark.parametrize("statement", GOOD, ids=lambda s: s["Sid"])
def test_tight_statements_pass(statement: dict[str, Any]) -> None:
    assert wildcard_violations(_doc(statement)) == []


BAD = [
    (_allow("Everything", "*", "*"), "Action '\\*'"),
    (_allow("AllOfS3", ["s3:*"], [BUCKET]), "Action 's3:\\*'"),
    (_allow("AnyObject", ["s3:GetObject"], "*"), "s3:GetObject"),
    (_allow("MixedStar", ["ecr:GetAuthorizationToken", "ecr:BatchGetImage"], ["*"]), "ecr:BatchGetImage"),
    (_allow("AnyNamespace", ["cloudwatch:PutMetricData"], "*"), "cloudwatch:PutMetricData"),
    (_allow("Mutating", ["ec2:TerminateInstances"], "*"), "ec2:TerminateInstances"),
    ({"Sid": "AllBut", "Effect": "Allow", "NotAction": ["iam:*"], "Resource": [BUCKET]}, "NotAction"),
]


@pytest.mark.parametrize(
    ("statement", "complaint"), BAD, ids=lambda v: v["Sid"] if isinstance(v, dict) else ""
)
def test_broad_statements_are_flagged(statement: dict[str, Any], complaint: str) -> None:
    found = wildcard_violations(_doc(*GOOD, statement))
    assert found  # and only this statement is blamed, for the reason expected
    assert all(statement["Sid"] in f for f in found)
    assert any(re.search(complaint, f) for f in found)


def test_a_single_statement_object_is_read_too() -> None:
    assert wildcard_violations({"Statement": _allow("Solo", "s3:*", BUCKET)})
    assert wildcard_violations({"Statement": []}) == []


DB_USER = "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABCDEFGHIJKL/model_runner"


def test_a_database_user_is_granted_rds_db_connect_on_that_user_only(
    offline: Callable[..., OfflineRun],
) -> None:
    def program() -> dict[str, Any]:
        access = ServiceAccess(database_user_arns=[DB_USER], kms_key_arns=[KEY])
        ServiceRole("mr", ServiceRoleArgs(service="model-runner", access=access))
        return {}

    policy = _policy(offline(program), "mr-policy")
    statement = _statement(policy, "ConnectAsDatabaseUser")
    assert (statement["Action"], statement["Resource"]) == (["rds-db:connect"], [DB_USER])
    assert not [a for a in _actions(policy) if a.startswith("secretsmanager:")]
    assert wildcard_violations(policy) == []


@pytest.mark.parametrize(
    "resource",
    [
        "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABCDEFGHIJKL/*",
        "arn:aws:rds-db:us-east-1:123456789012:dbuser:*/model_runner",
    ],
)
def test_connecting_as_any_database_user_is_flagged(resource: str) -> None:
    found = wildcard_violations(_doc(_allow("AnyUser", ["rds-db:connect"], [resource])))
    assert found and "rds-db:connect as any user" in found[0]
