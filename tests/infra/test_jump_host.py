"""The jump host: SSH only from the operator's networks, keys only, IMDSv2, encrypted."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from infra.jump_host import (
    ALLOWED_CIDRS_SETTING,
    PUBLIC_KEY_SETTING,
    JumpHost,
    JumpHostArgs,
    validate_public_key,
)
from stacks.offline import OfflineRun


def _ssh_key(key_type: str = "ssh-ed25519", blob_type: str | None = None) -> str:
    """A syntactically real OpenSSH public key line (the blob repeats the type, length-prefixed)."""
    name = (blob_type or key_type).encode()
    blob = len(name).to_bytes(4, "big") + name + (32).to_bytes(4, "big") + bytes(range(32))
    return f"{key_type} {base64.b64encode(blob).decode()} operator@laptop"


KEY = _ssh_key()
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"


def _run(
    offline: Callable[..., OfflineRun], cidrs: Sequence[str] = ("203.0.113.7/32",), **kw: Any
) -> OfflineRun:
    def program() -> dict[str, Any]:
        jump = JumpHost(
            "jump",
            JumpHostArgs(
                vpc_id="vpc-0123", subnet_id="subnet-0public", public_key=kw.pop("public_key", KEY),
                allowed_ssh_cidrs=cidrs, **kw,
            ),
        )  # fmt: skip
        return {
            "public_ip": jump.public_ip,
            "instance_id": jump.instance_id,
            "security_group_id": jump.security_group_id,
            "key_name": jump.key_name,
            "ssh_user": jump.ssh_user,
        }

    return offline(program)


def test_ssh_is_admitted_only_from_the_configured_cidrs(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, cidrs=["203.0.113.7/32", "198.51.100.0/28", "2001:db8:1::/48"])
    sg = run.outputs["security_group_id"]
    rules = [r for r in run.of_type(INGRESS) if r.inputs["securityGroupId"] == sg]
    assert len(rules) == len(run.of_type(INGRESS)) == 3
    sources = {r.inputs.get("cidrIpv4") or r.inputs.get("cidrIpv6") for r in rules}
    assert sources == {"203.0.113.7/32", "198.51.100.0/28", "2001:db8:1::/48"}
    for rule in rules:
        assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == ("tcp", 22, 22)
        assert "referencedSecurityGroupId" not in rule.inputs
    (group,) = run.of_type("aws:ec2/securityGroup:SecurityGroup")
    assert not group.inputs.get("ingress")
    (instance,) = run.of_type("aws:ec2/instance:Instance")
    assert instance.inputs["vpcSecurityGroupIds"] == [sg]


@pytest.mark.parametrize("open_cidr", ["0.0.0.0/0", "::/0"])
def test_the_whole_internet_is_rejected(offline: Callable[..., OfflineRun], open_cidr: str) -> None:
    with pytest.raises(ValueError) as err:
        _run(offline, cidrs=["203.0.113.7/32", open_cidr])
    assert ALLOWED_CIDRS_SETTING in str(err.value)
    assert "/32" in str(err.value)


@pytest.mark.parametrize("cidrs", [[], ()])
def test_an_empty_allow_list_is_rejected(offline: Callable[..., OfflineRun], cidrs: Sequence[str]) -> None:
    with pytest.raises(ValueError, match=ALLOWED_CIDRS_SETTING):
        _run(offline, cidrs=cidrs)


@pytest.mark.parametrize(
    "bad", ["203.0.113.7", "10.0.0.0/33", "10.0.0.1/24", "office", "203.0.113.7/32,10.0.0.0/8"]
)
def test_malformed_cidrs_are_rejected(offline: Callable[..., OfflineRun], bad: str) -> None:
    with pytest.raises(ValueError, match=ALLOWED_CIDRS_SETTING):
        _run(offline, cidrs=[bad])


def test_a_single_string_is_not_taken_for_a_list(offline: Callable[..., OfflineRun]) -> None:
    with pytest.raises(ValueError, match=ALLOWED_CIDRS_SETTING):
        _run(offline, cidrs="203.0.113.7/32")


@pytest.mark.parametrize(
    "bad_key",
    [
        "",
        "not a key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "ssh-ed25519",
        "ssh-ed25519 not*base64 me@laptop",
        _ssh_key("ssh-ed25519", blob_type="ssh-rsa"),
        _ssh_key("ssh-dss"),
    ],
)
def test_bad_public_keys_are_rejected_naming_the_setting(
    offline: Callable[..., OfflineRun], bad_key: str
) -> None:
    with pytest.raises(ValueError, match=PUBLIC_KEY_SETTING):
        _run(offline, public_key=bad_key)


def test_a_good_key_becomes_the_instances_key_pair(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, public_key=KEY + "\n")
    (pair,) = run.of_type("aws:ec2/keyPair:KeyPair")
    (instance,) = run.of_type("aws:ec2/instance:Instance")
    assert pair.inputs["publicKey"] == KEY
    assert instance.inputs["keyName"] == pair.outputs["keyName"] == run.outputs["key_name"]
    assert run.outputs["ssh_user"] == "ec2-user"
    assert validate_public_key(_ssh_key("ecdsa-sha2-nistp256")).startswith("ecdsa-sha2-nistp256 ")


def test_instance_requires_imdsv2_and_encrypts_its_root_volume(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, kms_key_arn="arn:aws:kms:us-east-1:123456789012:key/jump")
    (instance,) = run.of_type("aws:ec2/instance:Instance")
    assert instance.inputs["metadataOptions"]["httpTokens"] == "required"
    assert instance.inputs["rootBlockDevice"]["encrypted"] is True
    assert instance.inputs["rootBlockDevice"]["kmsKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/jump"
    assert instance.inputs["subnetId"] == "subnet-0public"


def test_sshd_is_hardened_for_keys_only_and_allows_tunnels(offline: Callable[..., OfflineRun]) -> None:
    (instance,) = _run(offline).of_type("aws:ec2/instance:Instance")
    lines = set(instance.inputs["userData"].splitlines())
    assert {"PasswordAuthentication no", "PermitRootLogin no", "AllowTcpForwarding yes"} <= lines
    assert "/etc/ssh/sshd_config.d/00-tessera.conf" in instance.inputs["userData"]


def test_public_address_is_the_elastic_ip_of_the_instance(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    (eip,) = run.of_type("aws:ec2/eip:Eip")
    (instance,) = run.of_type("aws:ec2/instance:Instance")
    assert eip.inputs["instance"] == instance.outputs["id"] == run.outputs["instance_id"]
    assert run.outputs["public_ip"] == eip.outputs["publicIp"]
    assert run.outputs["public_ip"]
