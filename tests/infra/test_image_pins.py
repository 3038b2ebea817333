"""A stack can run images CI built and pushed, by digest (``tessera:imageRefs``), instead of building them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stacks.offline import load_stack_config
from stacks.plan import plan_stack
from stacks.settings import ConfigError, Settings, getter_from_mapping, read_settings

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tessera-trainer@sha256:" + "0f" * 32


def _settings(refs: object) -> Settings:
    config = {"aws:region": "us-east-1", "tessera:layer": "data", "tessera:imageRefs": json.dumps(refs)}
    return read_settings(getter_from_mapping(config), "ci")


def test_pinned_refs_must_be_digests() -> None:
    settings = _settings({"trainer-gaudi": DIGEST})
    assert settings.image_refs == {"trainer-gaudi": DIGEST}
    for refs in ({"trainer": DIGEST.split("@", maxsplit=1)[0] + ":latest"}, {"trainer": 7}, ["trainer"]):
        with pytest.raises(ConfigError, match=r"tessera:imageRefs"):
            _settings(refs)


def test_a_pinned_image_is_run_and_not_built() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    config["tessera:imageRefs"] = {"trainer-gaudi": DIGEST}
    run = plan_stack("dev", ROOT, config=config).run
    assert run.outputs["trainerImageRefs"]["gaudi"] == DIGEST
    built = {i.name for i in run.of_type("docker:index/image:Image")}
    assert not any("trainer-gaudi" in name for name in built)
    assert any("trainer-cuda12" in name for name in built)  # the others are still built
