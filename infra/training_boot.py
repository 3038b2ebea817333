"""What a training instance runs on its own: its user data, rendered from the templates in ``infra/boot/``.

The templates are plain files with ``@NAME@`` placeholders (:func:`infra.instances.fill_template`); each is
named after what it becomes on the box (``tessera-trainer`` is ``/usr/local/bin/tessera-trainer``), or
after its part (``setup.sh``, ``user-data.sh``, ``read-utilization.<accelerator>.sh``). The idle agent's
systemd unit and wrapper belong to the agent (``services/trainer/host/``, which ``services.trainer.idle``
reads too): the box gets the very files the agent documents. The component itself is ``infra/training.py``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from infra.accelerators import GAUDI_SYNAPSE_VERSION, Accelerator
from infra.cloudwatch_agent import ACCELERATOR_NAMESPACE, ACCELERATOR_UTILIZATION_METRIC, AGENT_NAMESPACE
from infra.instances import fill_template, heredoc_install

BOOT_DIR = Path(__file__).parent / "boot"
"""The training box's templates (shipped as package data)."""

IDLE_AGENT_DIR = Path(__file__).resolve().parent.parent / "services" / "trainer" / "host"
"""The idle agent's own unit and wrapper, read as files (infra imports no services code); they sit beside
``services/trainer/idle.py``, which reads them too, in the repository and in an installed package alike."""

DATA_MOUNT = "/data"
DATA_DEVICE_NAME = "/dev/sdf"
TRAINER_CONTAINER = "tessera-trainer"
TRAINER_UID = 10001
"""The trainer image's user (``images/trainer.Dockerfile``): it writes the trainer state file."""
TRAINER_STATE_DIR = "/run/tessera"
TRAINER_STATE_FILE = f"{TRAINER_STATE_DIR}/trainer-state.json"
"""Where the trainer says whether it is busy and the idle agent reads it (``services.trainer.idle``)."""
TRAINER_IMAGE_FILE = "/etc/tessera/trainer.image"
"""The image the trainer start script resolved from SSM; the idle agent's wrapper runs the agent from it."""
IDLE_AGENT_PATH = "/usr/local/bin/tessera-idle-agent"
IDLE_AGENT_UNIT_PATH = "/etc/systemd/system/tessera-idle.service"
BUSY_NAMESPACE = "tessera/Training"
"""The busy heartbeat's namespace (copy of ``services.trainer.idle.BUSY_NAMESPACE``, kept equal by a test)."""
BUSY_METRIC = "Busy"
"""1 while the trainer runs a job, data staging included, or anyone is logged in; dimension ``InstanceId``."""
ACTIVITY_NAMESPACE = BUSY_NAMESPACE
ACTIVITY_METRIC = "Activity"
"""The idle alarm's one metric (dimension ``InstanceId`` only, as EC2 alarm actions require), published every
minute by the box's host timer: the busiest accelerator's utilisation in percent, or :data:`ACTIVITY_BUSY`
while a job runs or someone is logged in."""
ACTIVITY_BUSY = 100.0
"""The activity of a box with a job or a login: a percentage no idle threshold reaches."""
ACTIVITY_CHECK_PATH = "/usr/local/bin/tessera-activity"


def template(name: str) -> str:
    """The text of the template ``infra/boot/<name>``."""
    return (BOOT_DIR / name).read_text(encoding="utf-8")


IDLE_AGENT_UNIT = (IDLE_AGENT_DIR / "tessera-idle.service").read_text(encoding="utf-8")
"""``services/trainer/host/tessera-idle.service`` (``services.trainer.idle.SYSTEMD_UNIT``)."""

IDLE_AGENT_WRAPPER = (IDLE_AGENT_DIR / "tessera-idle-agent").read_text(encoding="utf-8")
"""``services/trainer/host/tessera-idle-agent`` (``services.trainer.idle.WRAPPER_SCRIPT``); ``@REGION@``
and ``@IDLE_MINUTES@`` are filled by :func:`render_user_data`."""

ACTIVITY_CHECK = template("tessera-activity")
"""``/usr/local/bin/tessera-activity``: the host's decision behind :data:`ACTIVITY_METRIC` (tests run it)."""


def utilization_namespace(accelerator: Accelerator) -> str:
    """Where the box's accelerator utilisation is published: by the CloudWatch agent's ``nvidia_gpu`` plugin
    in its own namespace (NVIDIA), or by the box itself in :data:`ACCELERATOR_NAMESPACE` (Gaudi, Neuron: no
    agent plugin exists for them). The safety net reads it there; the box's role may publish there."""
    return AGENT_NAMESPACE if accelerator == "nvidia" else ACCELERATOR_NAMESPACE


def render_user_data(
    *,
    accelerator: Accelerator,
    region: str,
    data_volume_id: str,
    config_parameter_name: str,
    log_group_name: str | None,
    agent_config: str,
    idle_minutes: int,
    agent_idle_minutes: int = 5,
    idle_alarm_name: str = "tessera-training-idle",
) -> str:
    """The instance's user data: a bash script that installs an idempotent setup script run at every boot.

    The setup mounts the data volume (formatting it only if it is blank), configures the CloudWatch agent,
    on Gaudi checks that Habana's driver is of :data:`GAUDI_SYNAPSE_VERSION`, and installs, enables and
    starts:
    the trainer service (``docker run ... worker trainer``, image and environment read from SSM at each start,
    ``/run/tessera`` mounted for its state file), the idle agent (:data:`IDLE_AGENT_UNIT` running
    :data:`IDLE_AGENT_WRAPPER`, which stops the box after ``agent_idle_minutes`` with no job, queue or login),
    a timer publishing :data:`ACTIVITY_METRIC` every minute (:data:`ACTIVITY_CHECK` decides it; on Gaudi and
    Neuron, which have no agent plugin, the accelerator utilisation too), and a timer that re-arms the idle
    alarm after each boot.
    """
    instance_id = template("instance-id.sh").strip("\n")
    common = {
        "INSTANCE_ID": instance_id,
        "REGION": region,
        "DATA": DATA_MOUNT,
        "CONTAINER": TRAINER_CONTAINER,
        "STATE_DIR": TRAINER_STATE_DIR,
    }
    with contextlib.suppress(ValueError):  # compact (EC2 takes 16 KiB of user data); not JSON: left as is
        agent_config = json.dumps(json.loads(agent_config), separators=(",", ":"))
    files = [
        heredoc_install("/opt/aws/amazon-cloudwatch-agent/etc/tessera.json", agent_config),
        heredoc_install(
            "/usr/local/bin/tessera-trainer",
            fill_template(
                template("tessera-trainer"),
                **common,
                PARAMETER=config_parameter_name,
                LOG_GROUP=log_group_name or "",
                DEVICE_ARGS=template(f"docker-devices.{accelerator}.sh").rstrip("\n"),
                STATE_FILE=TRAINER_STATE_FILE,
                IMAGE_FILE=TRAINER_IMAGE_FILE,
            ),
            mode="0755",
        ),
        heredoc_install(
            "/etc/systemd/system/tessera-trainer.service",
            fill_template(template("tessera-trainer.service"), **common),
        ),
        heredoc_install(
            IDLE_AGENT_PATH,
            fill_template(IDLE_AGENT_WRAPPER, REGION=region, IDLE_MINUTES=agent_idle_minutes),
            mode="0755",
        ),
        heredoc_install(IDLE_AGENT_UNIT_PATH, fill_template(IDLE_AGENT_UNIT)),
        heredoc_install(
            "/usr/local/bin/tessera-idle-rearm",
            fill_template(
                template("tessera-idle-rearm"),
                REGION=region,
                ALARM_NAME=idle_alarm_name,
                REARM_MINUTES=idle_minutes + 10,
            ),
            mode="0755",
        ),
        heredoc_install(
            "/etc/systemd/system/tessera-idle-rearm.service",
            fill_template(
                template("oneshot.service"),
                DESCRIPTION="tessera: re-arm the idle alarm",
                EXEC="/usr/local/bin/tessera-idle-rearm",
            ),
        ),
        heredoc_install(
            "/etc/systemd/system/tessera-idle-rearm.timer",
            # A full idle window of real datapoints (agent start-up and period alignment included) since boot.
            fill_template(
                template("schedule.timer"),
                DESCRIPTION="tessera: re-arm the idle alarm once a full idle window has passed since boot",
                SCHEDULE=f"OnBootSec={idle_minutes + 10}min",
            ),
        ),
    ]
    also = ""
    namespace = utilization_namespace(accelerator)
    if namespace != AGENT_NAMESPACE:  # the box, not the agent, publishes its accelerators' utilisation
        also = fill_template(
            template("publish-utilization.sh"), NAMESPACE=namespace, METRIC=ACCELERATOR_UTILIZATION_METRIC
        )
    files += [
        heredoc_install(ACTIVITY_CHECK_PATH, ACTIVITY_CHECK, mode="0755"),
        heredoc_install(
            "/usr/local/bin/tessera-activity-metric",
            fill_template(
                template("tessera-activity-metric"),
                REGION=region,
                INSTANCE_ID=instance_id,
                READER=template(f"read-utilization.{accelerator}.sh").strip("\n"),
                CHECK=ACTIVITY_CHECK_PATH,
                STATE_FILE=TRAINER_STATE_FILE,
                NAMESPACE=ACTIVITY_NAMESPACE,
                METRIC=ACTIVITY_METRIC,
                ALSO=also.rstrip("\n"),
            ),
            mode="0755",
        ),
        heredoc_install(
            "/etc/systemd/system/tessera-activity-metric.service",
            fill_template(
                template("oneshot.service"),
                DESCRIPTION="tessera: publish this box's activity (the idle alarm's metric) to CloudWatch",
                EXEC="/usr/local/bin/tessera-activity-metric",
            ),
        ),
        heredoc_install(
            "/etc/systemd/system/tessera-activity-metric.timer",
            fill_template(
                template("schedule.timer"),
                DESCRIPTION="tessera: publish this box's activity every minute",
                SCHEDULE="OnBootSec=1min\nOnUnitActiveSec=1min",
            ),
        ),
    ]
    if accelerator == "neuron":
        neuron_monitor = json.dumps(json.loads(template("neuron-monitor.json")))
        files.append(heredoc_install("/etc/tessera/neuron-monitor.json", neuron_monitor))
    units = [
        "tessera-activity-metric.timer",
        "tessera-idle-rearm.timer",
        "tessera-trainer.service",
        "tessera-idle.service",
    ]
    setup = fill_template(
        template("setup.sh"),
        REGION=region,
        VOLUME_ID=data_volume_id,
        DEVICE=DATA_DEVICE_NAME,
        DATA=DATA_MOUNT,
        STATE_DIR=TRAINER_STATE_DIR,
        TRAINER_UID=TRAINER_UID,
        FILES="mkdir -p /etc/tessera\n" + "".join(files).rstrip("\n"),
        DRIVER_CHECK=fill_template(template("gaudi-driver-check.sh"), SYNAPSE=GAUDI_SYNAPSE_VERSION)
        if accelerator == "gaudi"
        else "",
        UNITS=" ".join(units),
    )
    if "\nTESSERA_SETUP\n" in setup:
        raise ValueError("the setup script must not contain the line TESSERA_SETUP")
    return fill_template(template("user-data.sh"), ACCELERATOR=accelerator, SETUP=setup.rstrip("\n"))
