"""What a worker instance runs on its own: the boot script of a fleet's instances (:func:`worker_user_data`).

It installs the CloudWatch agent's configuration, logs in to ECR with the instance role, pulls the service's
image and runs its container for good. The fleet itself is ``infra/gpu_fleet.py``.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Mapping, Sequence

from infra.instances import USER_DATA_LIMIT_BYTES

AGENT_CONFIG_PATH = "/opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json"
AGENT_CTL = "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl"
#: Seconds `docker stop` waits after SIGTERM before SIGKILL (docker's default is 10).
CONTAINER_STOP_TIMEOUT_S = 30
_ECR_HOST = re.compile(r"^\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")


def worker_user_data(
    *,
    service: str,
    image_ref: str,
    region: str,
    gpu: bool,
    command: Sequence[str],
    environment: Mapping[str, str],
    log_group_name: str | None = None,
    agent_config_json: str | None = None,
    published_ports: Sequence[int] = (),
    container_healthcheck: bool = True,
) -> str:
    """The boot script of a worker: install the agent config, log in to ECR, pull the image and run it."""
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# tessera {service} worker: runs once, at first boot.",
        "set -euo pipefail",
        "exec > >(tee -a /var/log/tessera-bootstrap.log) 2>&1",
        f"REGION={q(region)}",
        f"IMAGE={q(image_ref)}",
        'retry() { local n; for n in 1 2 3 4 5; do "$@" && return 0; sleep $((n * 10)); done; "$@"; }',
        "# Docker comes with the Deep Learning AMI; plain Amazon Linux 2023 installs it.",
        "command -v docker >/dev/null 2>&1 || dnf install -y docker",
        "systemctl enable --now docker",
    ]
    if agent_config_json is not None:
        encoded = base64.b64encode(agent_config_json.encode()).decode()
        lines += [
            f"mkdir -p {AGENT_CONFIG_PATH.rsplit('/', 1)[0]}",
            f"echo {q(encoded)} | base64 -d > {AGENT_CONFIG_PATH}",
            f"[ -x {AGENT_CTL} ] || dnf install -y amazon-cloudwatch-agent",
            f"{AGENT_CTL} -a fetch-config -m ec2 -s -c file:{AGENT_CONFIG_PATH}",
        ]
    registry = image_ref.split("/", 1)[0] if "/" in image_ref else ""
    ecr = _ECR_HOST.match(registry)
    if ecr:
        # The instance role's credentials get the ECR token; nothing secret is written to user data.
        lines += [
            "ecr_login() {",
            f"  aws ecr get-login-password --region {q(ecr.group(1))} \\",
            f"    | docker login --username AWS --password-stdin {q(registry)}",
            "}",
            "retry ecr_login",
        ]
    lines.append('retry docker pull "$IMAGE"')
    run = [
        "docker run --detach",
        f"--name {q('tessera-' + service)}",
        "--restart unless-stopped",
        # `docker stop` (a redeploy, a reboot) gives the worker this long after SIGTERM: its drain time
        # (TESSERA_DRAIN_S, 20 s) to finish the message in hand, then the hand-back.
        f"--stop-timeout {CONTAINER_STOP_TIMEOUT_S}",
    ]
    if gpu:
        run += ["--gpus all", "--shm-size 2g"]  # torch data loaders share batches through /dev/shm
    run += [f"--publish {int(port)}:{int(port)}" for port in published_ports]
    if not container_healthcheck:
        run.append("--no-healthcheck")
    if log_group_name is not None:
        lines += [
            "TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token "
            "-H 'X-aws-ec2-metadata-token-ttl-seconds: 300')",
            'INSTANCE_ID=$(curl -sS -H "X-aws-ec2-metadata-token: $TOKEN" '
            "http://169.254.169.254/latest/meta-data/instance-id)",
        ]
        run += [
            "--log-driver awslogs",
            '--log-opt awslogs-region="$REGION"',
            f"--log-opt {q('awslogs-group=' + log_group_name)}",
            f'--log-opt awslogs-stream={q(service)}/"$INSTANCE_ID"',
        ]
    else:
        run += ["--log-driver json-file", "--log-opt max-size=50m", "--log-opt max-file=5"]
    env = {"AWS_REGION": region, "AWS_DEFAULT_REGION": region, **environment}
    run += [f"--env {q(f'{key}={value}')}" for key, value in env.items()]
    run.append('"$IMAGE"' + "".join(f" {q(arg)}" for arg in command))
    lines.append(" \\\n  ".join(run))
    script = "\n".join(lines) + "\n"
    if len(script.encode()) > USER_DATA_LIMIT_BYTES:
        raise ValueError(
            f"{service}: the boot script is {len(script.encode())} bytes, over EC2's "
            f"{USER_DATA_LIMIT_BYTES}; shorten the environment or the CloudWatch agent configuration"
        )
    return script
