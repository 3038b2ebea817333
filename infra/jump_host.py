"""The jump host: the one SSH entry point into the VPC, reachable only from the CIDRs the operator names.

Everything else (Grafana, training instances) sits in private subnets and admits SSH or HTTP only from this
host's security group; people reach them through SSH tunnels (``ssh -N -L ...``) or ``ProxyJump``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.instances import (
    allow_egress_anywhere,
    amazon_linux_ami,
    cidr_block,
    encrypted_root_volume,
    imdsv2_metadata_options,
)

ALLOWED_CIDRS_SETTING = "tessera:jumpHostAllowedCidrs"
"""The stack setting listing who may reach the jump host; named in validation errors."""

PUBLIC_KEY_SETTING = "tessera:jumpHostPublicKey"
"""The stack setting holding the operator's OpenSSH public key; named in validation errors."""

SSH_USER = "ec2-user"

SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
"""OpenSSH public key types accepted for the key pair."""

_SSHD_HARDENING = """\
# tessera jump host. Read before the distribution's defaults (first value wins in sshd_config).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PubkeyAuthentication yes
AuthenticationMethods publickey
# The jump host exists to forward: tunnels to Grafana (-L) and ProxyJump to training instances.
AllowTcpForwarding yes
GatewayPorts no
PermitTunnel no
X11Forwarding no
AllowAgentForwarding no
MaxAuthTries 3
LoginGraceTime 30
ClientAliveInterval 300
ClientAliveCountMax 2
AllowUsers ec2-user
"""

USER_DATA = f"""\
#!/bin/bash
# Harden sshd: keys only, no root, forwarding on (this host is the tunnel end).
set -euo pipefail
install -D -m 0600 /dev/stdin /etc/ssh/sshd_config.d/00-tessera.conf <<'TESSERA_EOF'
{_SSHD_HARDENING}TESSERA_EOF
sshd -t
systemctl reload sshd
"""
"""User data of the jump host (static: no secrets, no stack-specific values)."""


def validate_allowed_cidrs(cidrs: Sequence[str]) -> list[str]:
    """The CIDRs, checked: at least one, each a network in CIDR notation, none open to the whole internet."""
    if isinstance(cidrs, str) or not cidrs:
        raise ValueError(
            f"{ALLOWED_CIDRS_SETTING} must list at least one CIDR allowed to reach the jump host over SSH, "
            'e.g. your office or VPN address as a /32: ["203.0.113.7/32"]'
        )
    checked: list[str] = []
    for cidr in cidrs:
        network = cidr_block(cidr, ALLOWED_CIDRS_SETTING, "203.0.113.7/32")
        if network.prefixlen == 0:
            raise ValueError(
                f"{ALLOWED_CIDRS_SETTING}: {cidr!r} would open SSH to the whole internet. "
                "Set the addresses you connect from instead, e.g. your office or VPN address as a /32"
            )
        checked.append(str(network))
    return checked


def validate_public_key(public_key: str) -> str:
    """The key, checked to be one OpenSSH public key line (``ssh-ed25519 AAAA... comment``)."""
    fields = public_key.strip().split()
    hint = (
        f"{PUBLIC_KEY_SETTING} must be an OpenSSH public key, the one line of your ~/.ssh/id_ed25519.pub "
        "(starting with ssh-ed25519, ssh-rsa or ecdsa-sha2-...); never the private key"
    )
    if "PRIVATE KEY" in public_key:
        raise ValueError(f"{PUBLIC_KEY_SETTING} holds a private key. {hint}")
    if len(fields) < 2 or fields[0] not in SSH_KEY_TYPES or "\n" in public_key.strip():
        raise ValueError(hint)
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{hint}; its key data is not base64") from None
    # The blob starts with the key type again, as a length-prefixed string.
    length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + length].decode("ascii", "replace") != fields[0]:
        raise ValueError(f"{hint}; its key data does not match its type {fields[0]}")
    return " ".join(fields[:3])


@dataclass
class JumpHostArgs:
    """Settings of the jump host."""

    vpc_id: pulumi.Input[str]
    """The VPC of the jump host's security group."""
    subnet_id: pulumi.Input[str]
    """A public subnet (the host gets an Elastic IP)."""
    public_key: str
    """The operator's OpenSSH public key (``tessera:jumpHostPublicKey``); becomes an EC2 key pair."""
    allowed_ssh_cidrs: Sequence[str]
    """Who may reach tcp 22 (``tessera:jumpHostAllowedCidrs``): required, no /0."""
    instance_type: str = "t3.micro"
    """Instance type; forwarding SSH needs very little."""
    ami_id: str | None = None
    """A pinned AMI; None takes the newest Amazon Linux 2023 from its public SSM parameter (a newer AMI
    replaces the host on the next `pulumi up`, which is how it gets patched: it holds no state)."""
    root_volume_gb: int = 8
    """Root volume size (the AL2023 AMI's snapshot is 8 GB)."""
    kms_key_arn: pulumi.Input[str] | None = None
    """KMS key (ARN) for the root volume; None uses the account's default EBS key."""


class JumpHost(pulumi.ComponentResource):
    """A hardened SSH jump host with an Elastic IP, reachable only from the allowed CIDRs."""

    public_ip: pulumi.Output[str]
    instance_id: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    key_name: pulumi.Output[str]
    ssh_user: pulumi.Output[str]

    def __init__(self, name: str, args: JumpHostArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:JumpHost", name, None, opts)
        cidrs = validate_allowed_cidrs(args.allowed_ssh_cidrs)
        public_key = validate_public_key(args.public_key)
        child = pulumi.ResourceOptions(parent=self)

        # An explicit, stack-scoped name: people see it in the console and in `ssh -i` advice.
        self.key_pair = aws.ec2.KeyPair(
            f"{name}-key", key_name=f"tessera-{pulumi.get_stack()}-{name}", public_key=public_key, opts=child
        )

        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"tessera jump host {name}: SSH from the allowed CIDRs only",
            vpc_id=args.vpc_id,
            opts=child,
        )
        for index, cidr in enumerate(cidrs):
            is_v6 = ipaddress.ip_network(cidr).version == 6
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-ssh-{index}",
                security_group_id=self.security_group.id,
                ip_protocol="tcp",
                from_port=22,
                to_port=22,
                cidr_ipv4=None if is_v6 else cidr,
                cidr_ipv6=cidr if is_v6 else None,
                description="SSH from an allowed operator network",
                opts=child,
            )
        # Open egress: the host forwards to private hosts (whose own groups decide who gets in) and fetches
        # updates over HTTPS.
        allow_egress_anywhere(
            f"{name}-egress",
            self.security_group.id,
            description="forwarded connections and updates",
            opts=child,
        )

        ami: pulumi.Input[str] = args.ami_id or amazon_linux_ami(self)

        self.instance = aws.ec2.Instance(
            f"{name}-instance",
            ami=ami,
            instance_type=args.instance_type,
            subnet_id=args.subnet_id,
            vpc_security_group_ids=[self.security_group.id],
            key_name=self.key_pair.key_name,
            # The Elastic IP is its public address; no second, changing one.
            associate_public_ip_address=False,
            metadata_options=imdsv2_metadata_options(),
            root_block_device=encrypted_root_volume(args.root_volume_gb, args.kms_key_arn),
            user_data=USER_DATA,
            # The hardening lives in user data, which runs on first boot only: a change needs a new host.
            user_data_replace_on_change=True,
            opts=child,
        )
        self.eip = aws.ec2.Eip(f"{name}-eip", domain="vpc", instance=self.instance.id, opts=child)

        self.public_ip = self.eip.public_ip
        self.instance_id = self.instance.id
        self.security_group_id = self.security_group.id
        self.key_name = self.key_pair.key_name
        self.ssh_user = pulumi.Output.from_input(SSH_USER)
        self.register_outputs(
            {
                "public_ip": self.public_ip,
                "instance_id": self.instance_id,
                "security_group_id": self.security_group_id,
                "key_name": self.key_name,
                "ssh_user": self.ssh_user,
            }
        )
