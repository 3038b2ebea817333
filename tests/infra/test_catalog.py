"""The sight catalog on the platform: who is admitted where, what it runs, what its role may touch.

The component alone (its load balancers, security groups, fleets), the whole program (dev and the production
compute stack as shipped, and dev with the public listener configured), its settings, and the tunnel command.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from infra.catalog import (
    API_COMMAND,
    LISTENER_PORT,
    REFRESHER_COMMAND,
    Catalog,
    CatalogArgs,
)
from infra.catalog_balancers import (
    APP_PORT,
    HEALTH_PATH,
    HSTS,
    TLS_POLICY,
    CatalogPublicArgs,
    validate_certificate_arn,
    validate_domain,
    validate_public_cidrs,
)
from infra.registry import dockerfile_instructions
from services.cli import CommandError, catalog_tunnel, grafana_tunnel
from stacks.audit import ingress_rules, owner_of
from stacks.offline import Declared, OfflineRun, load_stack_config
from stacks.plan import Plan, plan_stack
from stacks.settings import ConfigError, getter_from_mapping, read_settings

ROOT = Path(__file__).resolve().parents[2]
JUMP_SG = "sg-0jumphost0000000"
SERVICE_SG = "sg-0catalogservice00"
JUMP_IP = "198.51.100.20"
PRIVATE = ["subnet-0priva", "subnet-0privb"]
PUBLIC = ["subnet-0puba", "subnet-0pubb"]
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tessera-sight-catalog@sha256:" + "cd" * 32
CERT = "arn:aws:acm:us-east-1:123456789012:certificate/0a1b2c3d-4e5f-6789-abcd-ef0123456789"
DOMAIN = "catalog.example.org"
OFFICE = ["198.51.100.0/24", "203.0.113.7/32"]

LB = "aws:lb/loadBalancer:LoadBalancer"
TG = "aws:lb/targetGroup:TargetGroup"
LISTENER = "aws:lb/listener:Listener"
RULE = "aws:lb/listenerRule:ListenerRule"
SG = "aws:ec2/securityGroup:SecurityGroup"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
LT = "aws:ec2/launchTemplate:LaunchTemplate"
ASG = "aws:autoscaling/group:Group"
POLICY = "aws:autoscaling/policy:Policy"


def _run(offline: Callable[..., OfflineRun], public: bool = False, **overrides: Any) -> OfflineRun:
    def program() -> dict[str, Any]:
        args: dict[str, Any] = {
            "vpc_id": "vpc-0123",
            "subnet_ids": PRIVATE,
            "jump_host_security_group_id": JUMP_SG,
            "service_security_group_id": SERVICE_SG,
            "image_ref": IMAGE,
            "instance_profile_name": "tessera-sight-catalog",
            "region": "us-east-1",
            "environment": {"TESSERA_DB_USER": "sight_catalog"},
            "log_group_name": "/tessera/dev/sight-catalog",
            **overrides,
        }
        if public:
            args["public"] = CatalogPublicArgs(
                certificate_arn=CERT, domain=DOMAIN, allowed_cidrs=OFFICE, subnet_ids=PUBLIC
            )
        catalog = Catalog("catalog", CatalogArgs(**args))
        return {
            "alb_dns_name": catalog.alb_dns_name,
            "alb_sg": catalog.alb_security_group_id,
            "app_sg": catalog.app_security_group_id,
            "url": catalog.url,
            "tunnel": catalog.tunnel_command(JUMP_IP),
            "public_url": catalog.public_url,
            "public_alb_dns_name": catalog.public_alb_dns_name,
            "public_sg": catalog.public.security_group_id if catalog.public else None,
        }

    return offline(program, config={"aws:region": "us-east-1"})


def _internal(run: OfflineRun) -> Declared:
    return next(lb for lb in run.of_type(LB) if lb.inputs["internal"] is True)


def _rules_on(run: OfflineRun, kind: str, group: str) -> list[Declared]:
    return [r for r in run.of_type(kind) if r.inputs["securityGroupId"] == group]


def _fleet(run: OfflineRun, part: str) -> tuple[Declared, Declared, str]:
    """The launch template, group and boot script of the catalog's ``api`` or ``refresher``."""
    (template,) = [t for t in run.of_type(LT) if t.name == f"catalog-{part}-lt"]
    (group,) = [g for g in run.of_type(ASG) if g.name == f"catalog-{part}-asg"]
    return template, group, base64.b64decode(template.inputs["userData"]).decode()


# --- the internal load balancer and who reaches it --------------------------------------------------------


def test_the_load_balancer_is_internal_in_the_private_subnets(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    (lb,) = run.of_type(LB)
    assert lb.inputs["internal"] is True and lb.inputs["loadBalancerType"] == "application"
    assert lb.inputs["subnets"] == PRIVATE
    assert lb.inputs["securityGroups"] == [run.outputs["alb_sg"]]
    assert lb.inputs["dropInvalidHeaderFields"] is True
    (listener,) = run.of_type(LISTENER)
    assert (listener.inputs["port"], listener.inputs["protocol"]) == (LISTENER_PORT, "HTTP")
    (tg,) = run.of_type(TG)
    assert listener.inputs["defaultActions"] == [{"type": "forward", "targetGroupArn": tg.outputs["arn"]}]
    assert run.outputs["alb_dns_name"].startswith("internal-")


def test_only_the_jump_host_reaches_the_load_balancer_on_its_listener_port(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline)
    (rule,) = _rules_on(run, INGRESS, run.outputs["alb_sg"])
    assert rule.inputs["ipProtocol"] == "tcp"
    assert (rule.inputs["fromPort"], rule.inputs["toPort"]) == (LISTENER_PORT, LISTENER_PORT)
    assert rule.inputs["referencedSecurityGroupId"] == JUMP_SG
    # Out, the load balancer reaches the API port of the API instances and nothing else.
    (egress,) = _rules_on(run, EGRESS, run.outputs["alb_sg"])
    assert (egress.inputs["fromPort"], egress.inputs["toPort"]) == (APP_PORT, APP_PORT)
    assert egress.inputs["referencedSecurityGroupId"] == run.outputs["app_sg"]


def test_api_instances_admit_only_the_load_balancer_on_the_app_port(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline)
    (rule,) = _rules_on(run, INGRESS, run.outputs["app_sg"])
    assert (rule.inputs["fromPort"], rule.inputs["toPort"]) == (APP_PORT, APP_PORT)
    assert rule.inputs["referencedSecurityGroupId"] == run.outputs["alb_sg"]
    # The service's own group (the one the database admits) stays egress-only: nothing here opens it.
    assert not _rules_on(run, INGRESS, SERVICE_SG)
    api, _, _ = _fleet(run, "api")
    refresher, _, _ = _fleet(run, "refresher")
    (api_nic,) = api.inputs["networkInterfaces"]
    (refresher_nic,) = refresher.inputs["networkInterfaces"]
    assert api_nic["securityGroups"] == [SERVICE_SG, run.outputs["app_sg"]]
    assert refresher_nic["securityGroups"] == [SERVICE_SG]  # it serves nothing
    for nic in (api_nic, refresher_nic):
        assert nic["associatePublicIpAddress"] == "false"


def test_no_address_range_reaches_the_catalog_without_the_public_listener(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline)
    for rule in run.of_type(INGRESS):
        assert not {"cidrIpv4", "cidrIpv6", "prefixListId"} & set(rule.inputs)
    assert all(not sg.inputs.get("ingress") for sg in run.of_type(SG))
    assert run.outputs["public_url"] is None and run.outputs["public_alb_dns_name"] is None


def test_the_target_group_checks_health_on_slash_health(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    (tg,) = run.of_type(TG)
    assert (tg.inputs["port"], tg.inputs["protocol"], tg.inputs["targetType"]) == (
        APP_PORT,
        "HTTP",
        "instance",
    )
    check = tg.inputs["healthCheck"]
    assert check["path"] == HEALTH_PATH == "/health"
    assert (check["protocol"], check["port"], check["matcher"]) == ("HTTP", "traffic-port", "200")
    # The API group registers in it and replaces what the load balancer finds unhealthy.
    _, api, _ = _fleet(run, "api")
    assert api.inputs["targetGroupArns"] == [tg.outputs["arn"]]
    assert api.inputs["healthCheckType"] == "ELB"
    _, refresher, _ = _fleet(run, "refresher")
    assert not refresher.inputs.get("targetGroupArns") and refresher.inputs["healthCheckType"] == "EC2"


# --- what runs where --------------------------------------------------------------------------------------


def test_the_api_publishes_its_port_and_scales_on_cpu(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, max_size=3)
    template, group, script = _fleet(run, "api")
    assert (group.inputs["minSize"], group.inputs["maxSize"]) == (1, 3)
    assert f"--publish {APP_PORT}:{APP_PORT}" in script
    assert script.rstrip().endswith('"$IMAGE" ' + " ".join(API_COMMAND))
    assert "--no-healthcheck" not in script
    assert template.inputs["metadataOptions"]["httpTokens"] == "required"
    assert template.inputs["blockDeviceMappings"][0]["ebs"]["encrypted"] == "true"
    (policy,) = run.of_type(POLICY)
    tracking = policy.inputs["targetTrackingConfiguration"]
    assert tracking["predefinedMetricSpecification"]["predefinedMetricType"] == "ASGAverageCPUUtilization"
    # One instance at most: nothing to scale.
    assert not _run(offline, max_size=1).of_type(POLICY)


def test_the_refresher_runs_alone_with_the_same_image_and_role(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    template, group, script = _fleet(run, "refresher")
    assert (group.inputs["minSize"], group.inputs["maxSize"]) == (1, 1)
    assert script.rstrip().endswith('"$IMAGE" ' + " ".join(REFRESHER_COMMAND))
    assert REFRESHER_COMMAND == ("worker", "sight-catalog")
    assert "--publish" not in script and "--no-healthcheck" in script
    assert f"IMAGE={IMAGE}" in script and "--env TESSERA_DB_USER=sight_catalog" in script
    api_template, _, _ = _fleet(run, "api")
    assert template.inputs["iamInstanceProfile"] == api_template.inputs["iamInstanceProfile"]
    tags = {t["key"]: t["value"] for t in group.inputs["tags"]}
    assert tags["Name"] == "tessera-sight-catalog-refresher" and tags["tessera:role"] == "refresher"


def test_the_tunnel_reaches_the_listener_through_the_jump_host(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    dns = run.outputs["alb_dns_name"]
    assert run.outputs["tunnel"] == (
        f"ssh -N -o ExitOnForwardFailure=yes -L {APP_PORT}:{dns}:{LISTENER_PORT} ec2-user@{JUMP_IP}"
    )
    assert run.outputs["url"] == f"http://localhost:{APP_PORT}"


def test_the_image_serves_what_the_platform_checks() -> None:
    text = (ROOT / "images" / "sight-catalog.Dockerfile").read_text(encoding="utf-8")
    final = text.rsplit("\nFROM ", 1)[1]
    found = dict(dockerfile_instructions("FROM " + final))
    assert json.loads(found["CMD"]) == list(API_COMMAND)
    assert found["EXPOSE"] == str(APP_PORT)
    assert f"http://127.0.0.1:{APP_PORT}{HEALTH_PATH}'" in found["HEALTHCHECK"]


# --- the opt-in public HTTPS listener ---------------------------------------------------------------------


def test_the_public_listener_is_https_only_from_the_configured_cidrs(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline, public=True)
    public_sg = run.outputs["public_sg"]
    rules = _rules_on(run, INGRESS, public_sg)
    assert sorted(r.inputs["cidrIpv4"] for r in rules) == sorted(OFFICE)
    for rule in rules:
        assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == (
            "tcp",
            443,
            443,
        )
        assert "referencedSecurityGroupId" not in rule.inputs
    # Every CIDR rule of the component is one of those.
    assert {r.name for r in run.of_type(INGRESS) if "cidrIpv4" in r.inputs} == {r.name for r in rules}
    (lb,) = [lb for lb in run.of_type(LB) if lb.inputs["internal"] is False]
    assert lb.inputs["subnets"] == PUBLIC and lb.inputs["securityGroups"] == [public_sg]
    assert lb.inputs["dropInvalidHeaderFields"] is True
    (listener,) = [li for li in run.of_type(LISTENER) if li.inputs["loadBalancerArn"] == lb.outputs["arn"]]
    assert (listener.inputs["port"], listener.inputs["protocol"]) == (443, "HTTPS")
    assert listener.inputs["sslPolicy"] == TLS_POLICY and "TLS13-1-2" in TLS_POLICY
    assert listener.inputs["certificateArn"] == CERT
    assert listener.inputs["routingHttpResponseStrictTransportSecurityHeaderValue"] == HSTS
    # No plain HTTP on the internet-facing side: HTTPS is its one listener.
    assert [li.inputs["port"] for li in run.of_type(LISTENER)].count(443) == 1
    assert sorted(li.inputs["port"] for li in run.of_type(LISTENER)) == [LISTENER_PORT, 443]
    # Only the configured host name reaches the catalog; anything else gets a 404.
    assert listener.inputs["defaultActions"][0]["fixedResponse"]["statusCode"] == "404"
    (host,) = run.of_type(RULE)
    assert host.inputs["conditions"] == [{"hostHeader": {"values": [DOMAIN]}}]
    assert run.outputs["public_url"] == f"https://{DOMAIN}"
    assert not run.outputs["public_alb_dns_name"].startswith("internal-")


def test_the_public_load_balancer_reaches_the_api_port_only(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, public=True)
    public_sg, app_sg = run.outputs["public_sg"], run.outputs["app_sg"]
    (egress,) = _rules_on(run, EGRESS, public_sg)
    assert (egress.inputs["fromPort"], egress.inputs["referencedSecurityGroupId"]) == (APP_PORT, app_sg)
    sources = sorted(r.inputs["referencedSecurityGroupId"] for r in _rules_on(run, INGRESS, app_sg))
    assert sources == sorted([run.outputs["alb_sg"], public_sg])
    assert {r.inputs["fromPort"] for r in _rules_on(run, INGRESS, app_sg)} == {APP_PORT}
    # Both target groups, one per load balancer (a target group serves one load balancer only).
    _, api, _ = _fleet(run, "api")
    assert sorted(api.inputs["targetGroupArns"]) == sorted(tg.outputs["arn"] for tg in run.of_type(TG))
    assert len(run.of_type(TG)) == 2
    assert {tg.inputs["healthCheck"]["path"] for tg in run.of_type(TG)} == {HEALTH_PATH}


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (validate_public_cidrs, [], "must list the networks"),
        (validate_public_cidrs, ["198.51.100.7"], "not a CIDR block"),
        (validate_public_cidrs, ["198.51.100.7/24"], "not a CIDR block"),
        (validate_public_cidrs, ["2001:db8::/32"], "IPv6"),
        (validate_domain, "https://catalog.example.org", "not a host name"),
        (validate_domain, "*.example.org", "not a host name"),
        (validate_domain, "localhost", "not a host name"),
    ],
)
def test_bad_public_settings_are_refused(check: Callable[[Any], Any], value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(value)


def test_the_certificate_must_be_an_acm_one_in_the_stacks_region() -> None:
    assert validate_certificate_arn(CERT, "us-east-1") == CERT
    with pytest.raises(ValueError, match="own region only: request one in eu-west-1"):
        validate_certificate_arn(CERT, "eu-west-1")
    with pytest.raises(ValueError, match="not an ACM certificate ARN"):
        validate_certificate_arn("arn:aws:iam::123456789012:server-certificate/x", "us-east-1")
    assert validate_domain("Catalog.Example.org.") == DOMAIN
    assert validate_public_cidrs(["0.0.0.0/0"]) == ["0.0.0.0/0"]  # a public site, said on purpose


# --- the whole program ------------------------------------------------------------------------------------


def _catalog_groups(run: OfflineRun) -> dict[str, str]:
    """Security group id -> logical name of every group the catalog component owns."""
    return {
        str(sg.get("id")): sg.name
        for sg in run.of_type(SG)
        if owner_of(run, sg) in ("tessera:infra:Catalog", "tessera:infra:CatalogPublicEndpoint")
    }


def test_dev_and_prod_compute_run_the_catalog_reachable_through_the_jump_host(
    dev: Plan, prod_compute: Plan, prod_data: Plan
) -> None:
    for plan, private in (
        (dev, dev.run.outputs["privateSubnetIds"]),
        (prod_compute, prod_data.run.outputs["privateSubnetIds"]),
    ):
        run, out = plan.run, plan.run.outputs
        (lb,) = run.of_type(LB)
        assert lb.inputs["internal"] is True and lb.inputs["subnets"] == private
        (jump_sg,) = [
            str(sg.get("id")) for sg in run.of_type(SG) if owner_of(run, sg) == "tessera:infra:JumpHost"
        ]
        groups = _catalog_groups(run)
        for rule in ingress_rules(run):
            if rule.group_id in groups:
                assert not rule.cidrs, f"{plan.stack}: {groups[rule.group_id]} admits an address range"
        (alb_rule,) = [r for r in ingress_rules(run) if r.group_id == lb.inputs["securityGroups"][0]]
        assert alb_rule.source_groups == (jump_sg,) and alb_rule.from_port == LISTENER_PORT
        assert out["catalogAlbDnsName"] == lb.outputs["dnsName"]
        assert out["catalogTunnelCommand"] == (
            f"ssh -N -o ExitOnForwardFailure=yes -L 8080:{lb.outputs['dnsName']}:80 "
            f"ec2-user@{out['jumpHostPublicIp']}"
        )
        assert "catalogPublicUrl" not in out and "catalogPublicAlbDnsName" not in out
        (api,) = [g for g in run.of_type(ASG) if g.name.endswith("catalog-api-asg")]
        assert out["fleetGroupNames"]["sight-catalog"] == api.outputs["name"]
        assert out["catalogRefresherGroupName"] != api.outputs["name"]


def test_every_catalog_instance_carries_the_group_the_database_admits(dev: Plan) -> None:
    run = dev.run
    service_sg = run.outputs["serviceSecurityGroupIds"]["sight-catalog"]
    templates = [t for t in run.of_type(LT) if "catalog" in t.name]
    assert len(templates) == 2
    for template in templates:
        assert service_sg in template.inputs["networkInterfaces"][0]["securityGroups"]
        script = base64.b64decode(template.inputs["userData"]).decode()
        assert "TESSERA_DB_USER=sight_catalog" in script


def test_the_catalog_role_is_least_privilege(dev: Plan) -> None:
    run, out = dev.run, dev.run.outputs
    (policy,) = [p for p in run.of_type("aws:iam/rolePolicy:RolePolicy") if "role-sight-catalog" in p.name]
    statements = {s["Sid"]: s for s in json.loads(policy.inputs["policy"])["Statement"]}
    assert statements["SendToQueues"]["Resource"] == [out["queueArns"]["training-jobs"]]
    assert "ConsumeQueues" not in statements
    datasets, models = out["bucketArns"]["datasets"], out["bucketArns"]["models"]
    assert statements["WriteObjects"]["Resource"] == [f"{datasets}/catalog/*"]
    assert statements["ReadObjects"]["Resource"] == [f"{datasets}/catalog/*", f"{models}/*"]
    listing = [s for sid, s in statements.items() if sid.startswith("ListReadBucket")]
    assert {(s["Resource"][0], json.dumps(s.get("Condition"))) for s in listing} == {
        (datasets, json.dumps({"StringLike": {"s3:prefix": ["catalog/*"]}})),
        (models, "null"),
    }
    assert statements["ConnectAsDatabaseUser"]["Resource"] == [f"{out['databaseUserArnPrefix']}sight_catalog"]
    assert statements["PullImages"]["Resource"] == [out["repositoryArns"]["sight-catalog"]]
    assert statements["WriteLogs"]["Resource"] == [f"{out['logGroupArns']['sight-catalog']}:*"]
    everything = json.dumps(statements)
    for other in ("image-requests", "sky-requests", "fits-frames", "secretsmanager:GetSecretValue"):
        assert other not in everything


def test_the_api_token_lives_in_its_own_secret_only_the_catalog_may_read_and_first_write(dev: Plan) -> None:
    run, out = dev.run, dev.run.outputs
    (secret,) = [x for x in run.of_type("aws:secretsmanager/secret:Secret") if x.name.endswith("-api-token")]
    assert secret.inputs["kmsKeyId"] == out["kmsKeyArn"]  # the platform's key; no value set by Pulumi
    assert not run.of_type("aws:secretsmanager/secretVersion:SecretVersion") or all(
        v.inputs.get("secretId") != secret.outputs["arn"]
        for v in run.of_type("aws:secretsmanager/secretVersion:SecretVersion")
    )
    (grant,) = [
        x for x in run.of_type("aws:iam/rolePolicy:RolePolicy") if x.name.endswith("-api-token-access")
    ]
    (statement,) = json.loads(grant.inputs["policy"])["Statement"]
    assert statement["Action"] == ["secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue"]
    assert statement["Resource"] == secret.outputs["arn"] == out["catalogTokenSecretArn"]
    roles = {r.name: r for r in run.of_type("aws:iam/role:Role")}
    assert any(name.endswith("role-sight-catalog-role") and role.outputs["name"] == grant.inputs["role"]
               for name, role in roles.items())  # fmt: skip
    api_env = _fleet_environment(run, "api")
    assert api_env["TESSERA_CATALOG_TOKEN_SECRET_ARN"] == secret.outputs["arn"]
    assert api_env["FORWARDED_ALLOW_IPS"] == "*"  # only the load balancers reach the app port
    assert "TESSERA_CATALOG_TOKEN_SECRET_ARN" not in _fleet_environment(run, "refresher")


REKOGNITION_MODEL = (
    "arn:aws:rekognition:us-east-1:123456789012:project/sights-paris/version/sights-paris.v1/1733380000000"
)


def test_rekognition_is_granted_on_the_configured_models_only_and_only_to_the_refresher() -> None:
    plain = plan_stack("dev").run
    assert not [x for x in plain.of_type("aws:iam/rolePolicy:RolePolicy") if "rekognition" in x.name]
    assert "rekognition" not in json.dumps([x.inputs for x in plain.of_type("aws:iam/rolePolicy:RolePolicy")])
    config = _dev_config(**{"tessera:catalogRekognitionModels": json.dumps({"paris": REKOGNITION_MODEL})})
    run = plan_stack("dev", config=config).run
    (grant,) = [x for x in run.of_type("aws:iam/rolePolicy:RolePolicy") if x.name.endswith("-rekognition")]
    (statement,) = json.loads(grant.inputs["policy"])["Statement"]
    assert statement["Action"] == ["rekognition:DetectCustomLabels"]
    assert statement["Resource"] == [REKOGNITION_MODEL]
    refresher = _fleet_environment(run, "refresher")
    assert json.loads(refresher["TESSERA_REKOGNITION_PROJECT_VERSIONS"]) == {"paris": REKOGNITION_MODEL}
    assert "TESSERA_REKOGNITION_PROJECT_VERSIONS" not in _fleet_environment(run, "api")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[1]", "give an object"),
        ('{"Paris": "x"}', "a city slug is lowercase"),
        ('{"paris": "arn:aws:s3:::bucket"}', "not a Custom Labels model version ARN"),
        (
            json.dumps({"paris": REKOGNITION_MODEL.replace("us-east-1", "eu-west-1")}),
            "the model is in eu-west-1",
        ),
    ],
)
def test_bad_rekognition_models_name_the_setting(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_stack("dev", config=_dev_config(**{"tessera:catalogRekognitionModels": value}))


def _fleet_environment(run: OfflineRun, part: str) -> dict[str, str]:
    """The ``docker run --env NAME=VALUE`` pairs of a catalog fleet's boot script (shell-quoted)."""
    (template,) = [t for t in run.of_type(LT) if t.name.endswith(f"-catalog-{part}-lt")]
    script = base64.b64decode(template.inputs["userData"]).decode()
    pairs = {}
    for line in script.splitlines():
        words = shlex.split(line.rstrip(" \\"))
        if len(words) == 2 and words[0] == "--env":
            name, _, value = words[1].partition("=")
            pairs[name] = value
    return pairs


def _dev_config(**changes: Any) -> dict[str, Any]:
    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    config.update(changes)
    return config


def _public_config() -> dict[str, Any]:
    return _dev_config(
        **{
            "tessera:catalogCertificateArn": CERT,
            "tessera:catalogDomain": DOMAIN,
            "tessera:catalogPublicCidrs": OFFICE,
        }
    )


def test_with_the_public_listener_only_443_from_the_configured_cidrs_is_added() -> None:
    plan = plan_stack("dev", config=_public_config())
    run = plan.run
    jump_cidrs = set(plan.settings.jump_host_allowed_cidrs)
    open_rules = [r for r in ingress_rules(run) if r.cidrs]
    by_owner = {owner_of(run, r.declared_by) for r in open_rules}
    assert by_owner == {"tessera:infra:JumpHost", "tessera:infra:CatalogPublicEndpoint"}
    for rule in open_rules:
        if owner_of(run, rule.declared_by) == "tessera:infra:JumpHost":
            assert (rule.from_port, set(rule.cidrs) <= jump_cidrs) == (22, True)
        else:
            assert (rule.from_port, rule.to_port) == (443, 443) and set(rule.cidrs) <= set(OFFICE)
    assert {c for r in open_rules for c in r.cidrs} == jump_cidrs | set(OFFICE)
    assert "0.0.0.0/0" not in {c for r in open_rules for c in r.cidrs}
    (public,) = [lb for lb in run.of_type(LB) if lb.inputs["internal"] is False]
    assert set(public.inputs["subnets"]) == set(run.outputs["publicSubnetIds"])
    assert run.outputs["catalogPublicUrl"] == f"https://{DOMAIN}"
    assert run.outputs["catalogPublicAlbDnsName"] == public.outputs["dnsName"]


def test_the_audit_accepts_the_configured_public_listener_and_nothing_wider() -> None:
    from stacks.audit import audit

    plan = plan_stack("dev", config=_public_config())
    assert [f for f in audit(plan.run, plan.settings) if f.rule == "exposure"] == []
    # The same graph judged against settings that allow other addresses: the office range is not one.
    narrower = replace(
        plan.settings,
        catalog_public=replace(plan.settings.catalog_public, allowed_cidrs=("192.0.2.0/24",)),
    )
    findings = [f.detail for f in audit(plan.run, narrower) if f.rule == "exposure"]
    assert findings and all("catalog HTTPS from" in message for message in findings)


def test_max_size_zero_leaves_the_catalog_out() -> None:
    config = _dev_config()
    config["tessera:fleets"] = {**config["tessera:fleets"], "sight-catalog": {"maxSize": 0}}
    plan = plan_stack("dev", config=config)
    assert not plan.run.of_type(LB) and "catalogAlbDnsName" not in plan.run.outputs
    assert not [g for g in plan.run.of_type(ASG) if "catalog" in g.name]
    with pytest.raises(ConfigError, match="the catalog is left out"):
        read_settings(
            getter_from_mapping({**_public_config(), "tessera:fleets": config["tessera:fleets"]}), "dev"
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tessera:catalogDomain": None}, "tessera:catalogDomain required too"),
        ({"tessera:catalogPublicCidrs": None}, "tessera:catalogPublicCidrs required too"),
        (
            {"tessera:catalogCertificateArn": CERT.replace("us-east-1", "eu-west-1")},
            "request one in us-east-1",
        ),
        (
            {"tessera:catalogCertificateArn": "arn:aws:acm:us-east-1:1:certificate/x"},
            "not an ACM certificate",
        ),
        ({"tessera:catalogDomain": "http://catalog.example.org"}, "not a host name"),
        ({"tessera:catalogPublicCidrs": ["2001:db8::/32"]}, "IPv6"),
        ({"tessera:catalogPublicCidrs": ["198.51.100.1/24"]}, "not a valid CIDR"),
        ({"tessera:catalogRefresherInstanceType": "g5.xlarge"}, "catalogRefresherInstanceType"),
        (
            {"tessera:fleets": {"sight-catalog": {"backlogPerInstance": 5}}},
            "sight-catalog.backlogPerInstance: the catalog's API serves people",
        ),
    ],
)
def test_bad_catalog_settings_name_the_key(change: dict[str, Any], message: str) -> None:
    config = {k: v for k, v in {**_public_config(), **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        read_settings(getter_from_mapping(config), "dev")


def test_settings_read_the_public_listener_and_a_data_stack_refuses_it() -> None:
    settings = read_settings(getter_from_mapping(_public_config()), "dev")
    assert settings.catalog_public is not None
    assert settings.catalog_public.allowed_cidrs == tuple(OFFICE)
    assert (settings.catalog_public.domain, settings.catalog_public.certificate_arn) == (DOMAIN, CERT)
    assert read_settings(getter_from_mapping(_dev_config()), "dev").catalog_public is None
    data = load_stack_config(str(ROOT / "Pulumi.prod-data.yaml"))
    with pytest.raises(ConfigError, match="belongs to the stack holding the compute layer"):
        read_settings(getter_from_mapping({**data, "tessera:catalogDomain": DOMAIN}), "prod-data")


def test_load_balancer_and_target_group_names_leave_room_for_pulumis_suffix(
    dev: Plan, prod_compute: Plan
) -> None:
    # AWS allows 32 characters; Pulumi appends "-" and 7 random characters to the logical name.
    plan = plan_stack("dev", config=_public_config())
    for run in (dev.run, prod_compute.run, plan.run):
        for resource in [*run.of_type(LB), *run.of_type(TG)]:
            assert "name" not in resource.inputs and "namePrefix" not in resource.inputs
            assert len(resource.name) + 8 <= 32, resource.name


# --- tessera tunnel catalog -------------------------------------------------------------------------------

DNS = "internal-tessera-catalog-alb-1234567-89.us-east-1.elb.amazonaws.com"


def test_tunnel_command_from_outputs() -> None:
    outputs = {"catalogAlbDnsName": DNS, "jumpHostPublicIp": JUMP_IP, "jumpHostSshUser": "ec2-user"}
    assert catalog_tunnel(outputs) == [
        "ssh",
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        f"8080:{DNS}:80",
        f"ec2-user@{JUMP_IP}",
    ]
    assert catalog_tunnel(outputs, 9000)[5] == f"9000:{DNS}:80"
    with pytest.raises(CommandError, match="catalogAlbDnsName"):
        catalog_tunnel({"jumpHostPublicIp": JUMP_IP})
    # Grafana's is unchanged.
    assert (
        grafana_tunnel({"grafanaPrivateIp": "10.40.3.7", "jumpHostPublicIp": JUMP_IP})[5]
        == "3000:10.40.3.7:3000"
    )


def test_tessera_tunnel_catalog_print(tmp_path: Path) -> None:
    pulumi = tmp_path / "pulumi"
    outputs = {"catalogAlbDnsName": DNS, "jumpHostPublicIp": "203.0.113.9"}
    pulumi.write_text(f"#!/bin/sh\necho '{json.dumps(outputs)}'\n")
    pulumi.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "tunnel", "catalog", "--stack", "dev", "--print"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ssh -N -o ExitOnForwardFailure=yes -L 8080:{DNS}:80 ec2-user@203.0.113.9"
