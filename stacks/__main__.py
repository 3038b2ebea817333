"""Entry point of the Pulumi program (``main: stacks/`` in Pulumi.yaml): read the config, declare it."""

import pulumi

from stacks.program import build, settings_from_pulumi

for _key, _value in build(settings_from_pulumi()).items():
    pulumi.export(_key, _value)
