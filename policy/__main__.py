"""The tessera policy pack: `pulumi preview --policy-pack policy` runs this file.

Every policy is mandatory: a finding fails the preview. The policies themselves live in tessera_policies.py
(importable and tested without this file: constructing ``PolicyPack`` starts the analyzer server and blocks).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pulumi_policy import EnforcementLevel, PolicyPack, StackValidationPolicy
from tessera_policies import STACK_POLICIES

PolicyPack(
    name="tessera",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=[
        StackValidationPolicy(name=policy.name, description=policy.description, validate=policy.validate)
        for policy in STACK_POLICIES
    ],
)
