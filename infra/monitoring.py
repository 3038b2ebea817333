"""Monitoring: Grafana OSS in a private subnet, reading CloudWatch through its instance role.

Grafana is reachable only from the jump host's security group (tcp 3000, and tcp 22 for maintenance), so
people open it through an SSH tunnel: :meth:`Monitoring.tunnel_command`. Its data source, dashboard provider
and dashboards are files in this repository (``infra/grafana/``), written onto the instance by its user data;
the instance holds no state worth keeping and is replaced whenever they change.

The admin password never passes through Pulumi: the component creates an empty Secrets Manager secret, and
the instance generates a password at first boot and stores it there (``put-secret-value``). Its role
therefore needs ``secretsmanager:PutSecretValue`` on :attr:`Monitoring.admin_secret_arn` (and
``kms:GenerateDataKey``/``kms:Encrypt`` on ``kms_key_arn`` when one is given), besides CloudWatch read access
(:func:`grafana_read_statements`: metrics, alarms and their history for annotations, and the EC2 and tagging
look-ups its template variables make). The stack grants them.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.encryption import partition_of
from infra.instances import (
    USER_DATA_LIMIT_BYTES,
    allow_egress_anywhere,
    allow_tcp_from_group,
    amazon_linux_ami,
    encrypted_root_volume,
    fill_template,
    heredoc_install,
    imdsv2_metadata_options,
)

GRAFANA_DIR = Path(__file__).parent / "grafana"
"""The Grafana files shipped with the package: ``provisioning/`` and ``dashboards/``."""

DEFAULT_DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
PROVISIONING_DIR = GRAFANA_DIR / "provisioning"

GRAFANA_PORT = 3000

DASHBOARDS_PATH_ON_HOST = "/var/lib/grafana/dashboards/tessera"
"""Where the dashboard provider (``provisioning/dashboards/tessera.yaml``) reads dashboards from."""

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")

_USER_DATA = r"""#!/bin/bash
# tessera monitoring: Grafana OSS @VERSION@ reading CloudWatch. Runs once, at first boot; a change to it
# replaces the instance (nothing on it is worth keeping: data source and dashboards come from these files).
set -euo pipefail
region=@REGION@
secret_arn='@SECRET_ARN@'

install -D -m 0644 /dev/stdin /etc/yum.repos.d/grafana.repo <<'TESSERA_EOF'
[grafana]
name=grafana
baseurl=https://rpm.grafana.com
repo_gpgcheck=1
enabled=1
gpgcheck=1
gpgkey=https://rpm.grafana.com/gpg.key
sslverify=1
sslcacert=/etc/pki/tls/certs/ca-bundle.crt
TESSERA_EOF
# Pinned: a new Grafana arrives by changing grafana_version, never by itself.
dnf install -y grafana-@VERSION@

@FILES@
chown -R root:grafana /etc/grafana/provisioning "@DASHBOARDS@"

# Admin password: made here and kept in Secrets Manager, so that it is never in code or Pulumi state.
umask 077
if [ ! -s /etc/grafana/admin-password ]; then
  python3 -c 'import secrets; print(secrets.token_urlsafe(24), end="")' > /etc/grafana/admin-password
fi
chown root:grafana /etc/grafana/admin-password
chmod 0640 /etc/grafana/admin-password
for attempt in 1 2 3 4 5 6; do
  if aws secretsmanager put-secret-value --region "$region" --secret-id "$secret_arn" \
       --secret-string file:///etc/grafana/admin-password >/dev/null; then
    break
  fi
  # Grafana still starts; the password stays on the box (/etc/grafana/admin-password) for an operator.
  [ "$attempt" = 6 ] && echo "could not store the Grafana admin password in $secret_arn" >&2
  sleep 10
done

install -D -m 0644 /dev/stdin /etc/systemd/system/grafana-server.service.d/tessera.conf <<TESSERA_EOF
[Service]
Environment=AWS_REGION=$region
Environment=GF_SERVER_HTTP_ADDR=0.0.0.0
Environment=GF_SERVER_HTTP_PORT=@PORT@
Environment=GF_SECURITY_ADMIN_USER=admin
Environment=GF_SECURITY_ADMIN_PASSWORD__FILE=/etc/grafana/admin-password
Environment=GF_SECURITY_DISABLE_GRAVATAR=true
Environment=GF_USERS_ALLOW_SIGN_UP=false
Environment=GF_AUTH_ANONYMOUS_ENABLED=false
Environment=GF_ANALYTICS_REPORTING_ENABLED=false
Environment=GF_ANALYTICS_CHECK_FOR_UPDATES=false
Environment=GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES=false
Environment=GF_AWS_ALLOWED_AUTH_PROVIDERS=default
TESSERA_EOF
systemctl daemon-reload
systemctl enable --now grafana-server
"""


def grafana_files(dashboards_dir: Path = DEFAULT_DASHBOARDS_DIR) -> dict[str, str]:
    """Every file Grafana needs, by its path on the instance: provisioning YAML and (minified) dashboards."""
    files: dict[str, str] = {}
    for source in sorted(PROVISIONING_DIR.rglob("*.yaml")):
        files[f"/etc/grafana/provisioning/{source.relative_to(PROVISIONING_DIR).as_posix()}"] = (
            source.read_text(encoding="utf-8")
        )
    dashboards = sorted(dashboards_dir.glob("*.json"))
    if not dashboards:
        raise ValueError(f"no Grafana dashboards (*.json) in {dashboards_dir}")
    for source in dashboards:
        try:
            dashboard = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from None
        # Minified: user data is limited to 16 KB.
        files[f"{DASHBOARDS_PATH_ON_HOST}/{source.name}"] = json.dumps(
            dashboard, separators=(",", ":"), ensure_ascii=False
        )
    return files


def render_user_data(
    *, region: str, grafana_version: str, admin_secret_arn: str, files: dict[str, str]
) -> str:
    """The first-boot script: install the pinned Grafana, write ``files``, set the admin password, start."""
    writes = [heredoc_install(path, body, quote_path=True) for path, body in files.items()]
    return fill_template(
        _USER_DATA,
        VERSION=grafana_version,
        REGION=region,
        SECRET_ARN=admin_secret_arn,
        PORT=GRAFANA_PORT,
        DASHBOARDS=DASHBOARDS_PATH_ON_HOST,
        FILES="".join(writes).rstrip("\n"),
    )


def encode_user_data(script: str) -> str:
    """``script`` gzipped (cloud-init unpacks it) and base64-encoded, checked against EC2's 16 KB limit."""
    # mtime=0: the same script gives the same bytes, so an unchanged script never looks like a change.
    packed = gzip.compress(script.encode("utf-8"), compresslevel=9, mtime=0)
    if len(packed) >= USER_DATA_LIMIT_BYTES:
        raise ValueError(
            f"Grafana user data is {len(packed)} bytes gzipped, over EC2's limit of "
            f"{USER_DATA_LIMIT_BYTES} bytes; trim the dashboards"
        )
    return base64.b64encode(packed).decode("ascii")


def grafana_read_statements(region: str, account_id: pulumi.Input[str]) -> list[dict[str, Any]]:
    """What Grafana's CloudWatch data source calls besides the metric reads, as IAM policy statements.

    The metrics-side part of AWS's ``AmazonGrafanaCloudWatchAccess`` policy (logs and cross-account
    observability left out: no dashboard here uses them): alarms for annotations (``DescribeAlarmHistory``,
    scoped to this account's alarms), and the look-ups behind dimension and region pickers.
    """
    return [
        {
            "Sid": "GrafanaAlarms",
            "Effect": "Allow",
            "Action": ["cloudwatch:DescribeAlarmsForMetric"],
            "Resource": "*",
        },
        {
            "Sid": "GrafanaAlarmHistory",
            "Effect": "Allow",
            "Action": ["cloudwatch:DescribeAlarmHistory"],
            "Resource": pulumi.Output.concat(
                f"arn:{partition_of(region)}:cloudwatch:{region}:", account_id, ":alarm:*"
            ),
        },
        {
            "Sid": "GrafanaTemplateVariables",
            "Effect": "Allow",
            "Action": [
                "ec2:DescribeInstances",
                "ec2:DescribeTags",
                "ec2:DescribeRegions",
                "tag:GetResources",
            ],
            "Resource": "*",
        },
    ]


@dataclass
class MonitoringArgs:
    """Settings of the Grafana instance."""

    vpc_id: pulumi.Input[str]
    """The VPC of Grafana's security group."""
    subnet_id: pulumi.Input[str]
    """A private subnet with a route out (NAT) for package downloads and the AWS APIs."""
    jump_host_security_group_id: pulumi.Input[str]
    """The only source allowed to reach Grafana (tcp 3000) and its SSH (tcp 22)."""
    instance_profile_name: pulumi.Input[str]
    """Instance profile with CloudWatch read and ``secretsmanager:PutSecretValue`` on ``admin_secret_arn``."""
    region: str
    """The AWS region: Grafana's default CloudWatch region and the one its CLI calls use."""
    instance_type: str = "t3.small"
    """Instance type (Grafana needs ~1 GB of memory)."""
    grafana_version: str = "11.6.0"
    """Pinned Grafana OSS version from rpm.grafana.com."""
    dashboards_dir: str = str(DEFAULT_DASHBOARDS_DIR)
    """Folder of dashboard JSON files to provision (default: ``infra/grafana/dashboards``)."""
    key_name: pulumi.Input[str] | None = None
    """EC2 key pair for SSH through the jump host; None means no key."""
    kms_key_arn: pulumi.Input[str] | None = None
    """KMS key (ARN) for the admin-password secret and the root volume; None uses the AWS managed keys."""
    ami_id: str | None = None
    """A pinned AMI; None takes the newest Amazon Linux 2023 from its public SSM parameter."""
    root_volume_gb: int = 20
    """Root volume size."""
    secret_recovery_window_days: int = 7
    """Days a deleted admin-password secret can still be restored (0 deletes at once)."""
    extra_files: dict[str, str] = field(default_factory=dict)
    """More files for the instance, by absolute path (e.g. another provisioning file)."""


class Monitoring(pulumi.ComponentResource):
    """Grafana OSS on a private instance, provisioned with CloudWatch and the tessera dashboards."""

    private_ip: pulumi.Output[str]
    instance_id: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    admin_secret_arn: pulumi.Output[str]
    url: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Monitoring", name, None, opts)
        if not _VERSION.match(args.grafana_version):
            raise ValueError(f"grafana_version must be a pinned X.Y.Z version (got {args.grafana_version!r})")
        files = {**grafana_files(Path(args.dashboards_dir)), **args.extra_files}
        child = pulumi.ResourceOptions(parent=self)

        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"tessera Grafana {name}: reachable from the jump host only",
            vpc_id=args.vpc_id,
            opts=child,
        )
        for rule, port, what in (("grafana", GRAFANA_PORT, "Grafana"), ("ssh", 22, "SSH")):
            allow_tcp_from_group(
                f"{name}-{rule}-from-jump",
                self.security_group.id,
                port=port,
                source_security_group_id=args.jump_host_security_group_id,
                description=f"{what} from the jump host (SSH tunnel)",
                opts=child,
            )
        # HTTPS only: the AWS APIs (CloudWatch, Secrets Manager), the OS and Grafana package repositories.
        allow_egress_anywhere(
            f"{name}-https-out",
            self.security_group.id,
            tcp_port=443,
            description="AWS APIs and package repositories",
            opts=child,
        )

        # No value here: the instance writes it (see the module docstring), so it never enters Pulumi state.
        self.admin_secret = aws.secretsmanager.Secret(
            f"{name}-grafana-admin",
            description=f"Grafana admin password of {name}, set by the instance at first boot (user admin)",
            kms_key_id=args.kms_key_arn,
            recovery_window_in_days=args.secret_recovery_window_days,
            opts=child,
        )

        ami: pulumi.Input[str] = args.ami_id or amazon_linux_ami(self)

        user_data_base64 = self.admin_secret.arn.apply(
            lambda arn: encode_user_data(
                render_user_data(
                    region=args.region,
                    grafana_version=args.grafana_version,
                    admin_secret_arn=arn,
                    files=files,
                )
            )
        )

        self.instance = aws.ec2.Instance(
            f"{name}-instance",
            ami=ami,
            instance_type=args.instance_type,
            subnet_id=args.subnet_id,
            vpc_security_group_ids=[self.security_group.id],
            iam_instance_profile=args.instance_profile_name,
            key_name=args.key_name,
            associate_public_ip_address=False,
            metadata_options=imdsv2_metadata_options(),
            root_block_device=encrypted_root_volume(args.root_volume_gb, args.kms_key_arn),
            user_data_base64=user_data_base64,
            # User data runs at first boot only: new dashboards or a new version need a new instance.
            user_data_replace_on_change=True,
            opts=child,
        )

        self.private_ip = self.instance.private_ip
        self.instance_id = self.instance.id
        self.security_group_id = self.security_group.id
        self.admin_secret_arn = self.admin_secret.arn
        self.url = pulumi.Output.from_input(f"http://localhost:{GRAFANA_PORT}")
        self.register_outputs(
            {
                "private_ip": self.private_ip,
                "instance_id": self.instance_id,
                "security_group_id": self.security_group_id,
                "admin_secret_arn": self.admin_secret_arn,
                "url": self.url,
            }
        )

    def tunnel_command(
        self,
        jump_public_ip: pulumi.Input[str],
        ssh_user: pulumi.Input[str] = "ec2-user",
        local_port: int = 3000,
    ) -> pulumi.Output[str]:
        """The SSH command that forwards ``localhost:<local_port>`` to Grafana through the jump host."""
        return pulumi.Output.concat(
            f"ssh -N -o ExitOnForwardFailure=yes -L {local_port}:",
            self.private_ip,
            f":{GRAFANA_PORT} ",
            ssh_user,
            "@",
            jump_public_ip,
        )
