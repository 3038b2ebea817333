"""What every tessera EC2 instance shares: where its AMI comes from, IMDSv2, an encrypted root volume, the
size limit on its user data, and the security-group rules that fence it in.

The components (jump host, Grafana, training instances, worker fleets) call these plain functions, so that
a rule such as "session tokens are required" is written once and reads the same everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import pulumi
import pulumi_aws as aws

AL2023_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
"""Public SSM parameter with the newest Amazon Linux 2023 AMI (x86_64)."""

USER_DATA_LIMIT_BYTES = 16 * 1024
"""EC2's limit on user data, counted before base64 encoding."""

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""What the name of a container's environment variable must look like on any instance: a shell name."""

PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
"""A placeholder in a boot script's template: ``@NAME@`` (bash's own ``${...}`` and ``{...}`` are left)."""

HEREDOC_END = "TESSERA_EOF"
"""The line that ends each here-document :func:`heredoc_install` writes."""


def amazon_linux_ami(parent: pulumi.Resource) -> pulumi.Output[str]:
    """The id of the newest Amazon Linux 2023 AMI, read from its public SSM parameter.

    A newer AMI shows up by itself on the next ``pulumi up``; pin an id in the component's args to hold one.
    """
    return aws.ssm.get_parameter_output(
        name=AL2023_AMI_PARAMETER, opts=pulumi.InvokeOutputOptions(parent=parent)
    ).value


def newest_amazon_ami(name_pattern: str, parent: pulumi.Resource) -> pulumi.Output[str]:
    """The id of the newest available x86_64 AMI published by Amazon whose name matches ``name_pattern``.

    Only Amazon's own AMIs are considered, so a look-alike published by someone else can never be picked.
    """
    return aws.ec2.get_ami_output(
        owners=["amazon"],
        most_recent=True,
        filters=[
            {"name": "name", "values": [name_pattern]},
            {"name": "architecture", "values": ["x86_64"]},
            {"name": "state", "values": ["available"]},
        ],
        opts=pulumi.InvokeOutputOptions(parent=parent),
    ).id


class NotOfferedError(ValueError):
    """No subnet of the stack is in a zone that offers the instance type; the message says what to change."""


def subnets_offering(
    instance_type: str,
    subnet_ids: pulumi.Input[Sequence[str]],
    *,
    setting: str,
    parent: pulumi.Resource,
) -> pulumi.Output[list[str]]:
    """Those of ``subnet_ids`` whose availability zone offers ``instance_type``, in their order, asked of AWS.

    Instance types are offered in some zones of a region only (and which zone a name means differs between
    accounts): a box pinned to a subnet of another zone never launches, and an Auto Scaling group spread over
    one retries there forever. When no subnet qualifies the deployment stops with the zones that do offer
    the type and the ``setting`` to change.
    """
    invoke = pulumi.InvokeOutputOptions(parent=parent)
    offered = aws.ec2.get_instance_type_offerings_output(
        location_type="availability-zone",
        filters=[{"name": "instance-type", "values": [instance_type]}],
        opts=invoke,
    ).locations
    candidates = pulumi.Output.from_input(subnet_ids).apply(list)

    def filters(values: list[list[str]]) -> list[aws.ec2.GetSubnetsFilterArgs]:
        subnets, zones = values
        # A filter needs a value: "none" matches no zone when AWS offers the type nowhere here.
        return [
            aws.ec2.GetSubnetsFilterArgs(name="subnet-id", values=subnets),
            aws.ec2.GetSubnetsFilterArgs(name="availability-zone", values=list(zones or ()) or ["none"]),
        ]

    in_offering_zones = aws.ec2.get_subnets_output(
        filters=pulumi.Output.all(candidates, offered).apply(filters), opts=invoke
    ).ids

    def keep(values: list[list[str]]) -> list[str]:
        subnets, qualifying, zones = values
        kept = [subnet for subnet in subnets if subnet in set(qualifying or ())]
        if kept:
            return kept
        where = ", ".join(sorted(zones or ())) or "no zone of this region"
        raise NotOfferedError(
            f"{setting}: {instance_type} is not offered in the zones of the stack's private subnets "
            f"({', '.join(subnets)}); AWS offers it in {where}. Choose an instance type offered there, or "
            "raise tessera:azCount on the data stack so that its subnets reach a zone that offers it."
        )

    return pulumi.Output.all(candidates, in_offering_zones, offered).apply(keep)


def subnet_offering(
    instance_type: str,
    subnet_ids: pulumi.Input[Sequence[str]],
    *,
    setting: str,
    parent: pulumi.Resource,
) -> pulumi.Output[str]:
    """The first of :func:`subnets_offering`: where a single box (the training instance) goes."""
    return subnets_offering(instance_type, subnet_ids, setting=setting, parent=parent).apply(lambda s: s[0])


def imdsv2_metadata_options(hop_limit: int = 1) -> aws.ec2.InstanceMetadataOptionsArgsDict:
    """Instance metadata with session tokens required (IMDSv2 only).

    ``hop_limit`` 1 keeps the credentials on the host; 2 lets a container (one network hop further, through
    Docker's bridge) reach the instance role.
    """
    return {
        "http_tokens": "required",
        "http_endpoint": "enabled",
        "http_put_response_hop_limit": hop_limit,
    }


def encrypted_root_volume(
    size_gb: int, kms_key_arn: pulumi.Input[str] | None
) -> aws.ec2.InstanceRootBlockDeviceArgsDict:
    """An encrypted gp3 root volume of ``size_gb``, deleted with its instance.

    ``kms_key_arn`` None encrypts with the account's default EBS key.
    """
    return {
        "volume_type": "gp3",
        "volume_size": size_gb,
        "encrypted": True,
        "kms_key_id": kms_key_arn,
        "delete_on_termination": True,
    }


def allow_tcp_from_group(
    resource_name: str,
    security_group_id: pulumi.Input[str],
    *,
    port: int,
    source_security_group_id: pulumi.Input[str],
    description: str,
    opts: pulumi.ResourceOptions,
) -> aws.vpc.SecurityGroupIngressRule:
    """Admit tcp ``port`` into a security group from the members of another group only (no CIDR)."""
    return aws.vpc.SecurityGroupIngressRule(
        resource_name,
        security_group_id=security_group_id,
        ip_protocol="tcp",
        from_port=port,
        to_port=port,
        referenced_security_group_id=source_security_group_id,
        description=description,
        opts=opts,
    )


def allow_egress_anywhere(
    resource_name: str,
    security_group_id: pulumi.Input[str],
    *,
    description: str,
    opts: pulumi.ResourceOptions,
    tcp_port: int | None = None,
) -> aws.vpc.SecurityGroupEgressRule:
    """Let a security group's members reach any IPv4 address: on every protocol and port, or on ``tcp_port``
    alone when it is given."""
    return aws.vpc.SecurityGroupEgressRule(
        resource_name,
        security_group_id=security_group_id,
        ip_protocol="-1" if tcp_port is None else "tcp",
        from_port=tcp_port,
        to_port=tcp_port,
        cidr_ipv4="0.0.0.0/0",
        description=description,
        opts=opts,
    )


def cidr_block(cidr: object, setting: str, example: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``cidr`` as a network in CIDR notation (a prefix length required, no host bits); ValueError naming
    ``setting`` and showing ``example`` otherwise."""
    text = str(cidr).strip()
    try:
        if "/" not in text:
            raise ValueError("no prefix length")
        return ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        raise ValueError(
            f"{setting}: {cidr!r} is not a CIDR block ({err}); write a network with its prefix length, "
            f"e.g. {example}"
        ) from None


def fill_template(template: str, **values: str | int) -> str:
    """``template`` with each ``@NAME@`` replaced by ``values[NAME]``, ending in one newline.

    Placeholders are filled in one pass, so a value that holds ``@NAME@`` text is left as it is. A
    placeholder with no value is refused (a ValueError names it): an unfilled one would reach the box.
    """
    missing = [name for name in PLACEHOLDER.findall(template) if name not in values]
    if missing:
        raise ValueError(f"boot script template placeholder @{missing[0]}@ was not filled")
    text = template.strip("\n") + "\n"
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def heredoc_install(path: str, body: str, *, mode: str = "0644", quote_path: bool = False) -> str:
    """A bash command that writes ``body`` to ``path`` with ``mode``, making its directories: ``install``
    reading a quoted here-document, so that nothing in ``body`` is expanded. ``quote_path`` puts the path in
    single quotes (names that are not plain words). ``body`` must not hold the line :data:`HEREDOC_END`."""
    if f"\n{HEREDOC_END}\n" in f"\n{body}\n":
        raise ValueError(f"{path}: content must not contain the line {HEREDOC_END}")
    target = f"'{path}'" if quote_path else path
    content = body.rstrip("\n")
    return f"install -D -m {mode} /dev/stdin {target} <<'{HEREDOC_END}'\n{content}\n{HEREDOC_END}\n"
