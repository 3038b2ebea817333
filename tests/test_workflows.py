"""The GitHub workflows: pinned actions, short-lived credentials only, no credentials for forks' code, the
backend of the README's choice, and the preview under the policy pack.

A tag (``@v4``) can be moved to other code by whoever controls the action's repository; a commit SHA cannot.
A long-lived token in a workflow that runs pull-request code is one leak away from the state of every stack.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@(?P<sha>[0-9a-f]{40})$")
USES_LINE = re.compile(r"^\s*(?:-\s*)?uses:\s*(?P<ref>\S+)\s*(?:#\s*(?P<comment>.*))?$")
VERSION = re.compile(r"^v\d+\.\d+\.\d+$")
WRITE_SCOPES_ALLOWED = {"id-token", "pull-requests"}


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    # YAML 1.1 reads the key `on` as True.
    doc.setdefault("on", doc.pop(True, None))
    return doc


def steps(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in doc["jobs"].items() for step in job.get("steps", [])]


def test_every_action_is_pinned_to_a_commit_with_its_version_beside_it() -> None:
    assert {p.name for p in WORKFLOWS} >= {"preview.yml", "tests.yml"}
    pins: dict[str, set[str]] = {}
    for path in WORKFLOWS:
        lines = [m for m in map(USES_LINE.match, path.read_text(encoding="utf-8").splitlines()) if m]
        assert lines, f"{path.name} uses no action"
        for line in lines:
            ref = line["ref"].strip("'\"")
            assert PINNED.match(ref), f"{path.name}: {ref} is not pinned to a full commit SHA"
            assert line["comment"] and VERSION.match(line["comment"].strip()), (
                f"{path.name}: {ref} needs the version it stands for as a trailing comment (# vX.Y.Z)"
            )
            action, _, sha = ref.partition("@")
            pins.setdefault(action, set()).add(f"{sha} {line['comment'].strip()}")
    # One action, one pin: the workflows move to a new version together.
    assert {action: len(shas) for action, shas in pins.items()} == dict.fromkeys(pins, 1), pins


def test_no_long_lived_credentials() -> None:
    for path in WORKFLOWS:
        text = path.read_text(encoding="utf-8")
        # Pulumi Cloud: an OIDC token exchange (pulumi/auth-actions), never a stored access token.
        assert "PULUMI_ACCESS_TOKEN" not in text, path.name
        # AWS: a role assumed through OIDC, never access keys.
        for key in (
            "aws-access-key-id",
            "aws-secret-access-key",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ):
            assert key not in text, f"{path.name} passes {key}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_permissions_and_no_credentials_for_forks(path: Path) -> None:
    doc = load(path)
    triggers = doc["on"] if isinstance(doc["on"], dict) else dict.fromkeys(doc["on"] or [])
    # pull_request_target runs with the base repository's secrets: a fork's code must never get them.
    assert "pull_request_target" not in triggers and "workflow_run" not in triggers
    top = doc.get("permissions")
    assert top is not None, "a workflow states its permissions (the default token may write)"
    assert all(level != "write" for level in (top or {}).values()), (
        "write scopes belong to the job that needs them"
    )
    for name, job in doc["jobs"].items():
        granted = {**(top or {}), **(job.get("permissions") or {})}
        writes = {scope for scope, level in granted.items() if level == "write"}
        assert writes <= WRITE_SCOPES_ALLOWED, f"{path.name}:{name} may write {writes}"
        uses = " ".join(str(s.get("uses", "")) for s in job.get("steps", []))
        credentialed = "configure-aws-credentials" in uses or "auth-actions" in uses
        assert ("id-token" in writes) == credentialed, f"{path.name}:{name}: id-token only where exchanged"
        if credentialed:
            assert "github.event.pull_request.head.repo.full_name == github.repository" in str(
                job.get("if")
            ), f"{path.name}:{name} exchanges credentials: it must not run for pull requests from forks"
    for name, step in steps(doc):
        if "actions/checkout" in str(step.get("uses")):
            assert (step.get("with") or {}).get("persist-credentials") is False, f"{path.name}:{name}"


def _preview() -> tuple[dict[str, Any], dict[str, Any]]:
    doc = load(ROOT / ".github" / "workflows" / "preview.yml")
    job = doc["jobs"]["preview"]
    (step,) = [s for s in job["steps"] if "pulumi/actions" in str(s.get("uses"))]
    assert step["with"]["command"] == "preview"
    return job, step


def test_the_preview_runs_under_the_policy_pack() -> None:
    _, step = _preview()
    # pulumi/actions passes each of `policyPacks` to the CLI as `--policy-pack <dir>`.
    pack = step["with"]["policyPacks"]
    assert (ROOT / pack / "PulumiPolicy.yaml").is_file() and (ROOT / pack / "__main__.py").is_file()
    job, _ = _preview()
    runs = " ".join(str(s.get("run", "")) for s in job["steps"])
    assert f"{pack}/requirements.txt" in runs, "the pack's virtualenv is installed before the preview"


def test_the_backend_is_pulumi_cloud_through_oidc_or_the_configured_url() -> None:
    job, step = _preview()
    assert step["with"]["cloud-url"] == "${{ vars.PULUMI_BACKEND_URL }}"
    assert step["env"]["PULUMI_CONFIG_PASSPHRASE"] == "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}"
    (auth,) = [s for s in job["steps"] if "pulumi/auth-actions" in str(s.get("uses"))]
    assert auth["if"] == "vars.PULUMI_BACKEND_URL == ''"
    assert auth["with"]["organization"] == "${{ vars.PULUMI_ORG }}"
    assert auth["with"]["requested-token-type"].startswith("urn:pulumi:token-type:access_token:")
    steps_in_order = [str(s.get("uses", "")) for s in job["steps"]]
    assert steps_in_order.index(str(auth["uses"])) < steps_in_order.index(str(step["uses"]))
