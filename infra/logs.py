"""One CloudWatch log group per service, with a retention and the platform key."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

# The only retention periods CloudWatch Logs accepts.
VALID_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip

_SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def check_retention(setting: str, days: int) -> None:
    """Raise ValueError naming ``setting`` unless ``days`` is a retention CloudWatch Logs accepts."""
    if days not in VALID_RETENTION_DAYS:
        raise ValueError(
            f"{setting}={days} is not a retention CloudWatch Logs accepts; set {setting} to one of "
            f"{', '.join(map(str, VALID_RETENTION_DAYS))}"
        )


@dataclass
class ServiceLogsArgs:
    """Which services get a log group, and how long their logs are kept."""

    prefix: str
    """Middle part of every group name, ``/tessera/<prefix>/<service>``: the stack name, since log group names
    are unique per account and region and the stacks of one account must not collide."""
    services: Sequence[str]
    """Service names (lowercase letters, digits, hyphens); one log group each."""
    retention_days: int = 30
    """Days CloudWatch keeps the events (one of the values CloudWatch accepts)."""
    kms_key_arn: pulumi.Input[str] | None = None
    """KMS key the groups are encrypted with; its policy must let logs.<region>.amazonaws.com use it."""

    def __post_init__(self) -> None:
        check_retention("ServiceLogsArgs.retention_days", self.retention_days)
        if not _SERVICE_NAME.match(self.prefix):
            raise ValueError(
                f"ServiceLogsArgs.prefix={self.prefix!r} is not usable in a log group name; "
                "set prefix to lowercase letters, digits and hyphens"
            )
        for service in self.services:
            if not _SERVICE_NAME.match(service):
                raise ValueError(
                    f"ServiceLogsArgs.services has {service!r}; set every service name to lowercase letters, "
                    "digits and hyphens"
                )
        if len(set(self.services)) != len(self.services):
            raise ValueError(f"ServiceLogsArgs.services lists a name twice: {list(self.services)}")


class ServiceLogs(pulumi.ComponentResource):
    """A CloudWatch log group ``/tessera/<prefix>/<service>`` for every service."""

    group_names: dict[str, pulumi.Output[str]]
    group_arns: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: ServiceLogsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:ServiceLogs", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.groups: dict[str, aws.cloudwatch.LogGroup] = {}
        for service in args.services:
            self.groups[service] = aws.cloudwatch.LogGroup(
                f"{name}-{service}",
                name=f"/tessera/{args.prefix}/{service}",
                retention_in_days=args.retention_days,
                kms_key_id=args.kms_key_arn,
                opts=child,
            )
        self.group_names = {s: g.name for s, g in self.groups.items()}
        self.group_arns = {s: g.arn for s, g in self.groups.items()}
        self.register_outputs({"group_names": self.group_names, "group_arns": self.group_arns})
