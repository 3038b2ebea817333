"""Hyper-parameter rules shared by the training tasks: defaults, types and ranges, checked in one place.

A task declares a ``Rule`` per parameter; :func:`resolve` merges a job's values over the defaults and raises
UserError naming the parameter and what it accepts. Unknown names are refused too, so a typo such as
``learning_rate`` for ``lr`` fails the job instead of being silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.errors import UserError


@dataclass(frozen=True)
class Rule:
    """One parameter: its default, its type (int, float, bool or str) and the values it accepts.

    ``low``/``high`` bound numbers (inclusive unless ``open_low``); ``choices`` lists the only values allowed.
    """

    default: Any
    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    open_low: bool = False
    multiple_of: int | None = None

    def accepts(self) -> str:
        """What the rule allows, in words for an error message."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}[
            self.kind
        ]
        if self.low is not None and self.high is not None:
            left = "(" if self.open_low else "["
            text = f"{kind} in {left}{_number(self.low)}, {_number(self.high)}]"
            return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")
        if self.low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {_number(self.low)}"
        return kind


def _number(value: float) -> str:
    """A bound as a person writes it: 2147483647, not 2.14748e+09; 0.001 stays 0.001."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def resolve(task: str, rules: Mapping[str, Rule], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` merged over the rules' defaults; a wrong name, type or value raises UserError."""
    unknown = sorted(set(given) - set(rules))
    if unknown:
        raise UserError(
            f"{task}: unknown parameter(s) {', '.join(unknown)}; known parameters: {', '.join(sorted(rules))}"
        )
    merged: dict[str, Any] = {}
    for name, rule in rules.items():
        value = given.get(name, rule.default)
        merged[name] = _checked(task, name, rule, value)
    return merged


def _checked(task: str, name: str, rule: Rule, value: Any) -> Any:
    bad = UserError(f"{task}: parameter {name} must be {rule.accepts()}, got {value!r}")
    if rule.kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif rule.kind is int:
        # bool is an int in Python; a job saying ``"batch_size": true`` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif rule.kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif rule.kind is list:
        if not isinstance(value, list | tuple):
            raise bad
        value = list(value)
    elif not isinstance(value, rule.kind):
        raise bad
    if rule.choices is not None and value not in rule.choices:
        raise bad
    if rule.low is not None and (value <= rule.low if rule.open_low else value < rule.low):
        raise bad
    if rule.high is not None and value > rule.high:
        raise bad
    if rule.multiple_of is not None and value % rule.multiple_of:
        raise bad
    return value
