"""The ``tessera`` command line: the one front door to the platform and its services.

Each command imports what it needs when it runs, so the Pulumi half (``plan``) and the service half never
load each other. This is the only module allowed to reach both ``stacks`` and the services.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.errors import UserError


class CommandError(UserError):
    """A command cannot go on; the message says what to do (a UserError: one line, status 2)."""


def _plan(args: argparse.Namespace) -> int:
    from stacks.plan import plan_stack, render

    plan = plan_stack(args.stack)
    sys.stdout.write(render(plan, width=args.width))
    return 0


def stack_outputs(stack: str | None, cwd: str | None = None) -> dict[str, Any]:
    """The outputs of a deployed stack, from ``pulumi stack output --json``."""
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise CommandError(
            "the Pulumi CLI is not on PATH; install it (https://www.pulumi.com/docs/install/) and log in "
            "to the "
            "backend that holds your stacks"
        )
    command = [pulumi, "stack", "output", "--json"]
    if stack:
        command += ["--stack", stack]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    if done.returncode != 0:
        raise CommandError(f"`{' '.join(command[1:])}` failed: {done.stderr.strip() or done.stdout.strip()}")
    try:
        outputs = json.loads(done.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise CommandError(f"pulumi printed something that is not JSON: {exc}") from None
    if not isinstance(outputs, dict):
        raise CommandError("pulumi stack output --json did not print a JSON object")
    return outputs


def _jump_tunnel(outputs: Mapping[str, Any], target_key: str, remote_port: int, local_port: int) -> list[str]:
    """The ssh command that forwards ``localhost:<local_port>`` through the jump host to the host named by
    output ``target_key`` (an address or a DNS name the jump host resolves) on ``remote_port``."""
    missing = [k for k in (target_key, "jumpHostPublicIp") if not outputs.get(k)]
    if missing:
        raise CommandError(
            f"the stack has no {', '.join(missing)} output: select the stack that holds the compute layer "
            "(e.g. --stack dev or --stack prod-compute) and run `pulumi up` there first"
        )
    user = outputs.get("jumpHostSshUser") or "ec2-user"
    return [
        "ssh",
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        f"{local_port}:{outputs[target_key]}:{remote_port}",
        f"{user}@{outputs['jumpHostPublicIp']}",
    ]


def grafana_tunnel(outputs: Mapping[str, Any], local_port: int = 3000) -> list[str]:
    """The ssh command that forwards ``localhost:<local_port>`` to Grafana through the jump host."""
    return _jump_tunnel(outputs, "grafanaPrivateIp", 3000, local_port)


def catalog_tunnel(outputs: Mapping[str, Any], local_port: int = 8080) -> list[str]:
    """The ssh command that forwards ``localhost:<local_port>`` to the sight catalog's internal load balancer
    (its HTTP listener, port 80) through the jump host."""
    return _jump_tunnel(outputs, "catalogAlbDnsName", 80, local_port)


#: ``tessera tunnel TARGET``: the command's maker, the local port it listens on by default, what to say.
TUNNELS: dict[str, tuple[Callable[[Mapping[str, Any], int], list[str]], int, str]] = {
    "grafana": (
        grafana_tunnel,
        3000,
        "Grafana: http://localhost:{port}  (admin password: the stack's grafanaAdminSecretArn; "
        "Ctrl-C closes the tunnel)",
    ),
    "catalog": (
        catalog_tunnel,
        8080,
        "Sight catalog: http://localhost:{port}  (Ctrl-C closes the tunnel)",
    ),
}


def _tunnel(args: argparse.Namespace) -> int:
    make, default_port, hint = TUNNELS[args.target]
    port = args.local_port if args.local_port is not None else default_port
    command = make(stack_outputs(args.stack), port)
    print(" ".join(command))
    if args.print_only:
        return 0
    print(hint.format(port=port), file=sys.stderr)
    if shutil.which("ssh") is None:
        raise CommandError("ssh is not on PATH; install an OpenSSH client")
    os.execvp("ssh", command)
    return 0  # pragma: no cover - execvp does not return


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(
        prog="tessera", description="GPU imagery machine learning on AWS: plan, run and operate the platform."
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = commands.add_parser(
        "plan", help="show every resource `pulumi up` would create for a stack, and its cost, offline"
    )
    plan.add_argument("--stack", default="dev", help="stack name; reads Pulumi.<stack>.yaml (default: dev)")
    plan.add_argument("--width", type=int, default=None, help="table width in characters")
    plan.set_defaults(handler=_plan)

    tunnel = commands.add_parser("tunnel", help="open an SSH tunnel through the jump host")
    tunnel.add_argument("target", choices=sorted(TUNNELS), help="what to reach")
    tunnel.add_argument(
        "--stack", default=None, help="the stack holding the compute layer (default: selected)"
    )
    tunnel.add_argument(
        "--local-port",
        type=int,
        default=None,
        help="local port to listen on (default: 3000 for grafana, 8080 for catalog)",
    )
    tunnel.add_argument(
        "--print", dest="print_only", action="store_true", help="print the ssh command instead of running it"
    )
    tunnel.set_defaults(handler=_tunnel)

    from services.fits_classifier import commands as fits_classifier
    from services.model_runner import commands as model_runner
    from services.sight_catalog import commands as sight_catalog
    from services.sight_catalog import worker as sight_catalog_worker
    from services.sky_generator import commands as sky_generator
    from services.trainer import commands as trainer

    model_runner.register(commands)
    trainer.register(commands)
    sky_generator.register(commands)
    fits_classifier.register(commands)
    sight_catalog.register(commands)
    worker = commands.add_parser("worker", help="serve a service's queues")
    services = worker.add_subparsers(dest="service", required=True, metavar="SERVICE")
    # Each service declares its own worker command: its options, its defaults (`--wait` is its own).
    for name, module in (
        ("model-runner", model_runner),
        ("trainer", trainer),
        ("sky-generator", sky_generator),
        ("fits-classifier", fits_classifier),
        ("sight-catalog", sight_catalog_worker),
    ):
        serve = services.add_parser(name, help=f"serve the {name}'s queues")
        module.add_worker_options(serve)
        serve.set_defaults(handler=_worker)
    return top


#: ``tessera worker SERVICE``: the module whose ``run_worker(args)`` serves that service's queues.
WORKERS = {
    "model-runner": "services.model_runner.commands",
    "trainer": "services.trainer.commands",
    "sky-generator": "services.sky_generator.commands",
    "fits-classifier": "services.fits_classifier.commands",
    "sight-catalog": "services.sight_catalog.worker",
}


def _worker(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(WORKERS[args.service]).run_worker(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors a user can fix print one line and exit 2."""
    from stacks.settings import ConfigError

    args = parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (UserError, ConfigError) as exc:
        # The one way a command fails on what a user can fix; handlers wrapped in user_errors (services/jobs/
        # commands.py) say their verb ("tessera fits serve: ..."), the rest their command.
        print(f"tessera {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The work in flight was stopped on the way out (a model's batches, the tile reader's threads);
        # outputs are written whole or not at all, so nothing half-written is left.
        print(f"tessera {args.command}: interrupted; nothing more was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
