"""The auto-stop safety net: stops only its stack's tagged instances, runs on a schedule, ships its code."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra import autostop as infra_autostop
from infra.autostop import AutoStop, AutoStopArgs, JobQueue, code_archive
from infra.cloudwatch_agent import (
    ACCELERATOR_NAMESPACE,
    ACCELERATOR_UTILIZATION_METRIC,
    AGENT_NAMESPACE,
    NVIDIA_UTILIZATION_METRIC,
)
from infra.iam import wildcard_violations
from infra.training import BUSY_METRIC, BUSY_NAMESPACE, TrainingInstance, TrainingInstanceArgs
from stacks.offline import Declared, OfflineRun
from stacks.plan import Plan

REPO = Path(__file__).resolve().parents[2]
CODE_DIR = str(REPO / "services" / "autostop")
ACCOUNT = "123456789012"
REGION = "eu-west-1"


def _run(offline: Callable[..., OfflineRun], **overrides: Any) -> OfflineRun:
    settings: dict[str, Any] = {"code_dir": CODE_DIR, "region": REGION}
    settings.update(overrides)

    def program() -> dict[str, Any]:
        net = AutoStop("autostop", AutoStopArgs(**settings))
        return {
            "function_arn": net.function_arn,
            "function_name": net.function_name,
            "policy": net.policy_json,
            "log_group_name": net.log_group_name,
            "alerts_topic_arn": net.alerts_topic_arn,
        }

    return offline(program, config={"aws:region": REGION})


def _one(run: OfflineRun, type_token: str) -> Declared:
    (resource,) = run.of_type(type_token)
    return resource


def _statements(run: OfflineRun) -> dict[str, dict[str, Any]]:
    policy = json.loads(_one(run, "aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    return {s["Sid"]: s for s in policy["Statement"]}


def test_it_may_stop_only_this_stacks_instances_tagged_for_auto_stop(
    offline: Callable[..., OfflineRun],
) -> None:
    statements = _statements(_run(offline))
    stoppers = [s for s in statements.values() if "ec2:StopInstances" in s["Action"]]
    assert len(stoppers) == 1
    (stop,) = stoppers
    assert stop["Action"] == ["ec2:StopInstances"]
    # Another stack's boxes follow that stack's function: its idle period, its queues' start grace.
    assert stop["Condition"] == {
        "StringEquals": {
            "ec2:ResourceTag/tessera:auto-stop": "true",
            "ec2:ResourceTag/tessera:stack": pulumi.get_stack(),
        }
    }
    # The account comes from the caller identity when not given.
    assert stop["Resource"] == f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*"


def test_policy_is_least_privilege(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, account_id="210987654321")
    statements = _statements(run)
    actions = sorted(a for s in statements.values() for a in s["Action"])
    assert actions == [
        "cloudwatch:GetMetricData",
        "cloudwatch:GetMetricStatistics",
        "ec2:DescribeInstances",
        "ec2:StopInstances",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    ]
    assert wildcard_violations({"Statement": list(statements.values())}) == []
    group = _one(run, "aws:cloudwatch/logGroup:LogGroup")
    assert statements["WriteOwnLogs"]["Resource"] == f"{group.get('arn')}:*"
    assert statements["StopAutoStopInstances"]["Resource"].split(":")[4] == "210987654321"
    trust = json.loads(_one(run, "aws:iam/role:Role").inputs["assumeRolePolicy"])
    (assume,) = trust["Statement"]
    assert assume["Principal"] == {"Service": "lambda.amazonaws.com"}


def test_the_schedule_invokes_the_function_every_five_minutes(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    function = _one(run, "aws:lambda/function:Function")
    rule = _one(run, "aws:cloudwatch/eventRule:EventRule")
    target = _one(run, "aws:cloudwatch/eventTarget:EventTarget")
    permission = _one(run, "aws:lambda/permission:Permission")
    assert rule.inputs["scheduleExpression"] == "rate(5 minutes)"
    assert target.inputs["rule"] == rule.get("name")
    assert target.inputs["arn"] == function.get("arn")
    assert permission.inputs["principal"] == "events.amazonaws.com"
    assert permission.inputs["action"] == "lambda:InvokeFunction"
    assert permission.inputs["function"] == function.get("name")
    assert permission.inputs["sourceArn"] == rule.get("arn")
    one_minute = _run(offline, schedule_minutes=1, idle_minutes=5)
    assert (
        _one(one_minute, "aws:cloudwatch/eventRule:EventRule").inputs["scheduleExpression"]
        == "rate(1 minute)"
    )


def test_function_settings_reach_its_environment(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, idle_minutes=20, gpu_idle_threshold_percent=7.5)
    function = _one(run, "aws:lambda/function:Function")
    variables = function.inputs["environment"]["variables"]
    assert variables["TESSERA_AUTOSTOP_IDLE_MINUTES"] == "20"
    assert variables["TESSERA_AUTOSTOP_THRESHOLD_PERCENT"] == "7.5"
    assert json.loads(variables["TESSERA_AUTOSTOP_METRICS"]) == [
        {"namespace": AGENT_NAMESPACE, "metric": NVIDIA_UTILIZATION_METRIC},
        {"namespace": ACCELERATOR_NAMESPACE, "metric": ACCELERATOR_UTILIZATION_METRIC},
    ]
    defaults = _one(_run(offline), "aws:lambda/function:Function").inputs["environment"]["variables"]
    assert defaults["TESSERA_AUTOSTOP_IDLE_MINUTES"] == "15"
    assert defaults["TESSERA_AUTOSTOP_THRESHOLD_PERCENT"] == "5"


def test_logs_go_to_its_own_encrypted_group_with_a_retention(offline: Callable[..., OfflineRun]) -> None:
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/0000-logs"
    run = _run(offline, kms_key_arn=key, log_retention_days=14, log_group_name="/tessera/dev/autostop")
    group = _one(run, "aws:cloudwatch/logGroup:LogGroup")
    assert group.inputs["name"] == "/tessera/dev/autostop"
    assert group.inputs["retentionInDays"] == 14
    assert group.inputs["kmsKeyId"] == key
    function = _one(run, "aws:lambda/function:Function")
    assert function.inputs["loggingConfig"]["logGroup"] == "/tessera/dev/autostop"
    assert run.outputs["log_group_name"] == "/tessera/dev/autostop"


def test_an_existing_log_group_is_used_not_created(offline: Callable[..., OfflineRun]) -> None:
    # The stack passes the data layer's group: a log group in the compute layer would die with it.
    arn = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/tessera/prod/autostop"
    run = _run(offline, log_group_name="/tessera/prod/autostop", log_group_arn=arn)
    assert run.of_type("aws:cloudwatch/logGroup:LogGroup") == []
    assert _statements(run)["WriteOwnLogs"]["Resource"] == f"{arn}:*"
    function = _one(run, "aws:lambda/function:Function")
    assert function.inputs["loggingConfig"]["logGroup"] == "/tessera/prod/autostop"
    assert run.outputs["log_group_name"] == "/tessera/prod/autostop"


def test_the_zip_is_built_from_the_given_directory(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    code = tmp_path / "autostop"
    code.mkdir()
    (code / "__init__.py").write_text("")
    (code / "handler.py").write_text("def handler(event, context):\n    return {}\n")
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "handler.cpython-312.pyc").write_bytes(b"\0")
    run = _run(offline, code_dir=str(code))
    function = _one(run, "aws:lambda/function:Function")
    archive = function.inputs["code"]
    assert isinstance(archive, pulumi.AssetArchive)
    assert all(isinstance(asset, pulumi.FileAsset) for asset in archive.assets.values())
    assert {name: getattr(asset, "path", None) for name, asset in archive.assets.items()} == {
        "autostop/__init__.py": str(code / "__init__.py"),
        "autostop/handler.py": str(code / "handler.py"),
    }
    # The handler setting names the module the zip holds.
    module, _, function_name = function.inputs["handler"].rpartition(".")
    assert f"{module.replace('.', '/')}.py" in archive.assets
    assert function_name == "handler"
    assert function.inputs["runtime"].startswith("python3.")


def test_the_real_service_directory_packs_the_handler() -> None:
    names = set(code_archive(CODE_DIR).assets)
    assert names == {"autostop/__init__.py", "autostop/handler.py"}


def test_infra_and_the_function_agree_on_the_tag_and_settings() -> None:
    # infra may not import service code, so the names are written twice; this keeps them in step.
    from services.autostop import handler

    assert (infra_autostop.AUTO_STOP_TAG, infra_autostop.AUTO_STOP_VALUE) == (
        handler.AUTO_STOP_TAG,
        handler.AUTO_STOP_VALUE,
    )
    assert infra_autostop.IDLE_MINUTES_ENV == handler.IDLE_MINUTES_ENV
    assert infra_autostop.THRESHOLD_ENV == handler.THRESHOLD_ENV
    assert infra_autostop.METRICS_ENV == handler.METRICS_ENV
    assert [(m.namespace, m.name) for m in handler.DEFAULT_METRICS] == list(infra_autostop.DEFAULT_METRICS)
    assert infra_autostop.BUSY_METRIC_ENV == handler.BUSY_METRIC_ENV
    for name in ("JOB_QUEUE_URLS_ENV", "TRAINING_STACK_ENV", "START_GRACE_ENV", "ROLE_TAG", "ROLE_TRAINING"):
        assert getattr(infra_autostop, name) == getattr(handler, name), name
    for name in ("START_ON_DEMAND_TAG", "START_ON_DEMAND_VALUE", "STACK_TAG"):
        assert getattr(infra_autostop, name) == getattr(handler, name), name
    busy = handler.DEFAULT_BUSY_METRIC
    assert (busy.namespace, busy.name) == (BUSY_NAMESPACE, BUSY_METRIC)


def test_the_function_reads_the_busy_heartbeat_the_training_box_publishes(
    offline: Callable[..., OfflineRun],
) -> None:
    from services.autostop import handler

    variables = _one(_run(offline), "aws:lambda/function:Function").inputs["environment"]["variables"]
    assert json.loads(variables["TESSERA_AUTOSTOP_BUSY_METRIC"]) == {
        "namespace": BUSY_NAMESPACE,
        "metric": BUSY_METRIC,
    }
    settings = handler.Settings.from_environment(variables)
    assert settings.busy_metric == handler.Metric(BUSY_NAMESPACE, BUSY_METRIC)


def test_a_failing_safety_net_notifies_an_encrypted_topic_operators_can_subscribe_to(
    offline: Callable[..., OfflineRun],
) -> None:
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/0000-stack"
    extra = f"arn:aws:sns:{REGION}:{ACCOUNT}:pager"
    run = _run(offline, kms_key_arn=key, alarm_actions=[extra])
    topic = _one(run, "aws:sns/topic:Topic")
    assert topic.inputs["kmsMasterKeyId"] == key
    assert run.outputs["alerts_topic_arn"] == topic.get("arn")
    assert ":sns:" in run.outputs["alerts_topic_arn"]
    (alarm,) = [
        a
        for a in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
        if a.inputs.get("metricName") == "Errors"
    ]
    assert alarm.inputs["alarmActions"] == [topic.get("arn"), extra]
    assert alarm.inputs["okActions"] == [topic.get("arn"), extra]


def test_the_training_instance_carries_the_tag_the_safety_net_looks_for(
    offline: Callable[..., OfflineRun],
) -> None:
    def program() -> dict[str, Any]:
        box = TrainingInstance(
            "trainer",
            TrainingInstanceArgs(
                vpc_id="vpc-0123",
                subnet_id="subnet-0private",
                instance_profile_name="tessera-training",
                image_ref="123456789012.dkr.ecr.eu-west-1.amazonaws.com/tessera/trainer:1",
                region=REGION,
                availability_zone=f"{REGION}b",
            ),
        )
        return {"id": box.instance_id}

    run = offline(program, config={"aws:region": REGION})
    tags = _one(run, "aws:ec2/instance:Instance").inputs["tags"]
    assert tags[infra_autostop.AUTO_STOP_TAG] == infra_autostop.AUTO_STOP_VALUE
    # ... and the tags it may start (tessera:stack is the provider's default tag, set by stacks/program.py).
    assert tags[infra_autostop.ROLE_TAG] == infra_autostop.ROLE_TRAINING
    assert tags[infra_autostop.START_ON_DEMAND_TAG] == infra_autostop.START_ON_DEMAND_VALUE


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"code_dir": "/nonexistent"}, "has no handler.py"),
        ({"idle_minutes": 0}, "idle_minutes"),
        ({"schedule_minutes": 30}, "schedule_minutes"),
        ({"gpu_idle_threshold_percent": 0}, "gpu_idle_threshold_percent"),
        ({"log_retention_days": 10}, "log_retention_days"),
        ({"metrics": ()}, "metrics"),
        ({"log_group_arn": "arn:aws:logs:eu-west-1:1:log-group:x"}, "needs log_group_name"),
        ({"start_grace_minutes": -1}, "start_grace_minutes"),
        ({"training_stack": " "}, "training_stack"),
    ],
)
def test_bad_settings_say_what_to_fix(overrides: dict[str, Any], match: str) -> None:
    settings: dict[str, Any] = {"code_dir": CODE_DIR, "region": REGION, **overrides}
    with pytest.raises(ValueError, match=match):
        AutoStopArgs(**settings)


QUEUE_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:tessera-dev-training-jobs"
QUEUE_URL = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/tessera-dev-training-jobs"
VOLUME_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/0000-volumes"


def _with_queue(offline: Callable[..., OfflineRun], **overrides: Any) -> OfflineRun:
    return _run(
        offline,
        job_queues=[JobQueue(url=QUEUE_URL, arn=QUEUE_ARN)],
        training_stack="dev",
        training_volume_kms_key_arn=VOLUME_KEY,
        **overrides,
    )


def test_with_a_job_queue_it_may_start_only_this_stacks_training_instance(
    offline: Callable[..., OfflineRun],
) -> None:
    statements = _statements(_with_queue(offline))
    starters = [s for s in statements.values() if "ec2:StartInstances" in s["Action"]]
    assert len(starters) == 1
    (start,) = starters
    assert start["Action"] == ["ec2:StartInstances"]
    assert start["Resource"] == f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*"
    assert start["Condition"] == {
        "StringEquals": {
            "ec2:ResourceTag/tessera:role": "training",
            "ec2:ResourceTag/tessera:start-on-demand": "true",
            "ec2:ResourceTag/tessera:stack": "dev",
        }
    }
    (count,) = [s for s in statements.values() if "sqs:GetQueueAttributes" in s["Action"]]
    assert count["Action"] == ["sqs:GetQueueAttributes"] and count["Resource"] == [QUEUE_ARN]
    # Starting an instance with volumes under a customer key has EC2 create a grant in the caller's name.
    (grant,) = [s for s in statements.values() if any(a.startswith("kms:") for a in s["Action"])]
    assert grant["Action"] == ["kms:CreateGrant"] and grant["Resource"] == VOLUME_KEY
    assert grant["Condition"] == {
        "Bool": {"kms:GrantIsForAWSResource": "true"},
        "StringEquals": {"kms:ViaService": f"ec2.{REGION}.amazonaws.com"},
    }
    # Nothing else is new: the same actions as without a queue, plus those three.
    actions = sorted(a for s in statements.values() for a in s["Action"])
    without = sorted(a for s in _statements(_run(offline)).values() for a in s["Action"])
    assert actions == sorted([*without, "ec2:StartInstances", "kms:CreateGrant", "sqs:GetQueueAttributes"])
    assert wildcard_violations({"Statement": list(statements.values())}) == []


def test_without_a_job_queue_it_may_start_nothing(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, training_volume_kms_key_arn=VOLUME_KEY, training_stack="dev")
    actions = {a for s in _statements(run).values() for a in s["Action"]}
    assert not actions & {"ec2:StartInstances", "kms:CreateGrant", "sqs:GetQueueAttributes"}
    variables = _one(run, "aws:lambda/function:Function").inputs["environment"]["variables"]
    assert json.loads(variables["TESSERA_AUTOSTOP_JOB_QUEUE_URLS"]) == []


def test_the_queue_and_stack_reach_the_function(offline: Callable[..., OfflineRun]) -> None:
    from services.autostop import handler

    run = _with_queue(offline, start_grace_minutes=20)
    variables = _one(run, "aws:lambda/function:Function").inputs["environment"]["variables"]
    settings = handler.Settings.from_environment(variables)
    assert settings.job_queue_urls == (QUEUE_URL,)
    assert settings.training_stack == "dev"
    assert settings.start_grace_minutes == 20
    # The current stack by default: the tessera:stack tag its provider puts on the training instance.
    default = _one(
        _run(offline, job_queues=[JobQueue(url=QUEUE_URL, arn=QUEUE_ARN)]), "aws:lambda/function:Function"
    )
    assert default.inputs["environment"]["variables"]["TESSERA_AUTOSTOP_TRAINING_STACK"] == pulumi.get_stack()


def test_the_stacks_start_their_training_box_for_the_training_jobs_queue(
    dev: Plan, prod_compute: Plan
) -> None:
    for plan, stack in ((dev, "dev"), (prod_compute, "prod-compute")):
        (policy,) = [p for p in plan.run.of_type("aws:iam/rolePolicy:RolePolicy") if "autostop" in p.name]
        statements = {s["Sid"]: s for s in json.loads(policy.inputs["policy"])["Statement"]}
        (queue_arn,) = statements["CountQueuedJobs"]["Resource"]
        assert "training-jobs" in queue_arn and ":sqs:" in queue_arn
        condition = statements["StartTrainingInstancesOfThisStack"]["Condition"]["StringEquals"]
        assert condition["ec2:ResourceTag/tessera:stack"] == stack
        (function,) = [f for f in plan.run.of_type("aws:lambda/function:Function") if "autostop" in f.name]
        variables = function.inputs["environment"]["variables"]
        (queue_url,) = json.loads(variables["TESSERA_AUTOSTOP_JOB_QUEUE_URLS"])
        assert "training-jobs" in queue_url
        assert variables["TESSERA_AUTOSTOP_TRAINING_STACK"] == stack
        # It may stop only what it looks after: the tag every resource of the stack gets from its provider.
        stop = statements["StopAutoStopInstances"]["Condition"]["StringEquals"]
        (provider,) = [p for p in plan.run.of_type("pulumi:providers:aws") if p.name == "aws"]
        tags = provider.inputs["defaultTags"]  # a provider's inputs reach the mocks as JSON text
        default_tags = (json.loads(tags) if isinstance(tags, str) else tags)["tags"]
        assert stop["ec2:ResourceTag/tessera:stack"] == default_tags["tessera:stack"]
        assert stop["ec2:ResourceTag/tessera:stack"] == stack
