"""What every tessera instance shares: Amazon-only AMIs, IMDSv2, encrypted root volumes, narrow SG rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.instances import (
    AL2023_AMI_PARAMETER,
    allow_egress_anywhere,
    allow_tcp_from_group,
    amazon_linux_ami,
    encrypted_root_volume,
    fill_template,
    heredoc_install,
    imdsv2_metadata_options,
    newest_amazon_ami,
)
from stacks.offline import OfflineRun

INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"


class _Holder(pulumi.ComponentResource):
    def __init__(self, name: str) -> None:
        super().__init__("tessera:test:Holder", name, None, None)


def _run(offline: Callable[..., OfflineRun], body: Callable[[_Holder], dict[str, Any]]) -> OfflineRun:
    return offline(lambda: body(_Holder("holder")))


@pytest.mark.parametrize("hop_limit", [1, 2])
def test_metadata_requires_session_tokens(hop_limit: int) -> None:
    options = imdsv2_metadata_options(hop_limit)
    assert options["http_tokens"] == "required" and options["http_endpoint"] == "enabled"
    assert options["http_put_response_hop_limit"] == hop_limit
    assert imdsv2_metadata_options()["http_put_response_hop_limit"] == 1


@pytest.mark.parametrize("kms_key_arn", [None, "arn:aws:kms:us-east-1:123456789012:key/k"])
def test_root_volumes_are_encrypted_and_go_with_their_instance(kms_key_arn: str | None) -> None:
    volume = encrypted_root_volume(40, kms_key_arn)
    assert volume["encrypted"] is True and volume["kms_key_id"] == kms_key_arn
    assert (volume["volume_type"], volume["volume_size"]) == ("gp3", 40)
    assert volume["delete_on_termination"] is True


def test_ami_lookups_ask_amazon_only(offline: Callable[..., OfflineRun]) -> None:
    run = _run(
        offline,
        lambda holder: {
            "al2023": amazon_linux_ami(holder),
            "dlami": newest_amazon_ami("Deep Learning AMI Habana *", holder),
        },
    )
    calls = dict(run.mocks.calls)
    assert calls["aws:ssm/getParameter:getParameter"] == {"name": AL2023_AMI_PARAMETER}
    lookup = calls["aws:ec2/getAmi:getAmi"]
    assert lookup["owners"] == ["amazon"] and lookup["mostRecent"] is True
    assert {"name": "name", "values": ["Deep Learning AMI Habana *"]} in lookup["filters"]
    assert {"name": "architecture", "values": ["x86_64"]} in lookup["filters"]
    assert run.outputs["al2023"].startswith("ami-") and run.outputs["dlami"].startswith("ami-")


def test_ingress_names_a_source_group_and_one_port(offline: Callable[..., OfflineRun]) -> None:
    def body(holder: _Holder) -> dict[str, Any]:
        child = pulumi.ResourceOptions(parent=holder)
        allow_tcp_from_group(
            "rule", "sg-target", port=3000, source_security_group_id="sg-jump", description="d", opts=child
        )
        return {}

    (rule,) = _run(offline, body).of_type(INGRESS)
    assert rule.inputs["securityGroupId"] == "sg-target"
    assert rule.inputs["referencedSecurityGroupId"] == "sg-jump"
    assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == ("tcp", 3000, 3000)
    assert "cidrIpv4" not in rule.inputs and "cidrIpv6" not in rule.inputs
    assert rule.parent == "holder"


def test_egress_is_every_protocol_or_one_tcp_port(offline: Callable[..., OfflineRun]) -> None:
    def body(holder: _Holder) -> dict[str, Any]:
        child = pulumi.ResourceOptions(parent=holder)
        allow_egress_anywhere("all-out", "sg-1", description="all", opts=child)
        allow_egress_anywhere("https-out", "sg-1", tcp_port=443, description="https", opts=child)
        return {}

    run = _run(offline, body)
    rules = {r.name: r.inputs for r in run.of_type(EGRESS)}
    assert rules["all-out"]["ipProtocol"] == "-1"
    assert "fromPort" not in rules["all-out"] and "toPort" not in rules["all-out"]
    assert (rules["https-out"]["ipProtocol"], rules["https-out"]["fromPort"]) == ("tcp", 443)
    assert rules["https-out"]["toPort"] == 443
    assert {r["cidrIpv4"] for r in rules.values()} == {"0.0.0.0/0"}


def test_a_template_is_filled_in_one_pass_and_refuses_a_placeholder_left_unfilled() -> None:
    template = "\n\nregion=@REGION@ minutes=@MINUTES@ ${keep} {x}\n\n"
    assert fill_template(template, REGION="@MINUTES@", MINUTES=7, UNUSED="x") == (
        "region=@MINUTES@ minutes=7 ${keep} {x}\n"
    )
    with pytest.raises(ValueError, match="@MINUTES@ was not filled"):
        fill_template(template, REGION="eu-west-1")


def test_a_heredoc_writes_the_body_verbatim_and_refuses_its_own_end_line() -> None:
    assert heredoc_install("/etc/x.conf", "a=$b\n\n") == (
        "install -D -m 0644 /dev/stdin /etc/x.conf <<'TESSERA_EOF'\na=$b\nTESSERA_EOF\n"
    )
    assert heredoc_install("/opt/my file", "x", mode="0755", quote_path=True).startswith(
        "install -D -m 0755 /dev/stdin '/opt/my file' <<'TESSERA_EOF'\n"
    )
    for body in ("TESSERA_EOF", "a\nTESSERA_EOF", "TESSERA_EOF\nb"):
        with pytest.raises(ValueError, match="TESSERA_EOF"):
            heredoc_install("/etc/x", body)
