"""What every audit rule reads: each declared resource as a plain :class:`Record`, wherever it came from,
what else a rule may know (:class:`Context`), and the :class:`Finding` a rule reports.

Records come from an offline run (:func:`records_of`) or from the CrossGuard policy pack's
``PolicyResource`` s (:func:`records_from_policy`); values the engine does not know yet are :data:`UNKNOWN`.
The rules themselves are ``stacks/audit.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stacks.cost import LAYER_TYPES
from stacks.offline import OfflineRun
from stacks.settings import Settings

#: How the engine marks a secret value in serialized inputs: ``{SIG: SECRET_SIG, "value": ...}``.
SIG, SECRET_SIG = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"


@dataclass(frozen=True)
class Finding:
    """One broken invariant: which rule, which resource, what is wrong (``urn``: the resource's, if known)."""

    rule: str
    resource: str
    detail: str
    urn: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"[{self.rule}] {self.resource}: {self.detail}"


class Unknown:
    """A value the engine does not know yet (a preview of a resource about to be created)."""

    def __repr__(self) -> str:
        return "<unknown>"


#: The one unknown value; truthy, never equal to a known value, never a string.
UNKNOWN = Unknown()

#: The engine's sentinels for unknown values, as the policy SDK hands them over (pulumi-policy's proxy.py).
UNKNOWN_SENTINELS = frozenset(
    {
        "1c4a061d-8072-4f0a-a4cb-0ff528b18fe7",  # boolean
        "3eeb2bf0-c639-47a8-9e75-3b44932eb421",  # number
        "04da6b54-80e4-46f7-96ec-b56ff0331ba9",  # string
        "6a19a0b0-7e62-4c92-b797-7f8e31da9cc2",  # array
        "030794c1-ac77-496b-92df-f27374a8bd58",  # asset
        "e48ece36-62e2-4504-bad9-02848725956a",  # archive
        "dd056dcd-154b-4c76-9bd3-c8f88648b5ff",  # object
    }
)


@dataclass(frozen=True)
class Record:
    """One declared resource as the rules see it, wherever it came from.

    ``props`` holds inputs and outputs by engine key (camelCase), :data:`UNKNOWN` where not known yet;
    ``ancestors`` the type tokens of its parents, nearest first; ``deps`` (policy path only) the aliases of
    the resources each property's value was computed from; ``source`` the object it was made from.
    """

    type: str
    name: str
    props: Mapping[str, Any]
    ancestors: tuple[str, ...] = ()
    protect: bool = False
    custom: bool = True
    urn: str = ""
    deps: Mapping[str, tuple[frozenset[str], ...]] = field(default_factory=dict)
    source: Any = field(default=None, compare=False, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A property by its engine key."""
        return self.props.get(key, default)

    @property
    def aliases(self) -> frozenset[str]:
        """What another resource's property holds when it points at this one: its id (or ARN, or name for
        a bucket) once known, and its URN (what the engine's dependencies name)."""
        names = {self.urn} if self.urn else set()
        for key in ("id", "arn", "bucket") if self.type.startswith("aws:s3/bucket") else ("id", "arn"):
            value = self.props.get(key)
            if isinstance(value, str) and value:
                names.add(value)
        return frozenset(names)

    @property
    def ref(self) -> str:
        """The id once known, else the URN: one string that names this resource."""
        value = self.props.get("id")
        return value if isinstance(value, str) and value else self.urn

    def references(self, key: str) -> tuple[frozenset[str], ...]:
        """The resources (as alias sets) property ``key`` points at: its known values, or, where the engine
        recorded the resources the value was computed from, those."""
        value = self.props.get(key)
        if self.deps.get(key):
            if isinstance(value, str) and len(self.deps[key]) == 1:
                return (self.deps[key][0] | {value},)
            return self.deps[key]
        values = value if isinstance(value, list) else [value]
        return tuple(frozenset({v}) for v in values if isinstance(v, str) and v)

    @property
    def owner(self) -> str | None:
        """The type of the nearest infra component it belongs to (``tessera:infra:JumpHost``...)."""
        return next((a for a in self.ancestors if a.startswith("tessera:infra:")), None)

    @property
    def layer(self) -> str:
        """'data', 'compute', or 'stack' (providers and references), from its place in the program."""
        for kind in (self.type, *self.ancestors):
            if kind in LAYER_TYPES:
                return LAYER_TYPES[kind]
        return "stack"

    @property
    def label(self) -> str:
        return f"{self.type.split(':')[-1]} {self.name}"

    def finding(self, rule: str, detail: str) -> Finding:
        return Finding(rule, self.label, detail, self.urn)


def records_of(run: OfflineRun) -> list[Record]:
    """Every resource of an offline run as a record (props: its inputs, then its mocked outputs over them)."""
    return [
        Record(
            type=r.type,
            name=r.name,
            props={**r.inputs, **r.outputs},
            ancestors=tuple(a.type for a in run.ancestors(r)),
            protect=r.protect,
            custom=r.custom,
            urn=f"urn:offline:{r.type}::{r.name}",
            source=r,
        )
        for r in run.resources
    ]


def _raw(value: Any) -> Any:
    # The policy SDK wraps dicts and lists in proxies that raise on unknown values; "__target" unwraps one.
    if isinstance(value, Mapping | Sequence) and not isinstance(value, str | bytes):
        try:
            return value["__target"]  # type: ignore[call-overload]
        except (KeyError, TypeError, IndexError):
            return value
    return value


def plain(value: Any) -> Any:
    """A policy SDK value as plain dicts and lists, with :data:`UNKNOWN` for every unknown and the secrets
    the engine marks unwrapped (as the SDK hands them over)."""
    value = _raw(value)
    if isinstance(value, Mapping) and value.get(SIG) == SECRET_SIG:
        return plain(value.get("value"))
    if isinstance(value, Mapping):
        return {str(k): plain(_raw(value)[k]) for k in value}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    if isinstance(value, str) and value in UNKNOWN_SENTINELS:
        return UNKNOWN
    return value


def _is_component(type_token: str) -> bool:
    return type_token == "pulumi:pulumi:Stack" or type_token.startswith("tessera:")


def records_from_policy(resources: Iterable[Any]) -> list[Record]:
    """Records from a stack validation's ``args.resources`` (pulumi-policy ``PolicyResource`` s: type, name,
    props, urn, opts, parent, property_dependencies); read by attribute, so plain objects of that shape do."""
    resources = list(resources)
    props = {id(r): plain(r.props) for r in resources}

    def aliases(r: Any) -> frozenset[str]:
        found = props.get(id(r))
        record = Record(r.resource_type, r.name, found if found is not None else plain(r.props), urn=r.urn)
        return record.aliases

    records = []
    for r in resources:
        ancestors = []
        parent = getattr(r, "parent", None)
        while parent is not None:
            ancestors.append(parent.resource_type)
            parent = getattr(parent, "parent", None)
        deps = {
            key: tuple(aliases(d) for d in depends_on)
            for key, depends_on in (getattr(r, "property_dependencies", None) or {}).items()
            if depends_on
        }
        opts = getattr(r, "opts", None)
        records.append(
            Record(
                type=r.resource_type,
                name=r.name,
                props=props[id(r)],
                ancestors=tuple(ancestors),
                protect=bool(getattr(opts, "protect", False)),
                custom=not _is_component(r.resource_type),
                urn=r.urn,
                deps=deps,
                source=r,
            )
        )
    return records


def of_type(records: Iterable[Record], *type_tokens: str) -> list[Record]:
    """The custom resources of the given types."""
    return [r for r in records if r.type in type_tokens and r.custom]


def is_known(value: Any) -> bool:
    return value is not UNKNOWN


def as_mapping(value: Any) -> Mapping[str, Any]:
    """A nested object, or an empty one where there is none (or it is not known yet)."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class Context:
    """What a rule may need besides the records: the stack's settings, values fetched at deploy time."""

    settings: Settings | None = None
    #: Strings a provider function returned (the ECR login token): fetched at deploy time, not inline.
    fetched: Collection[str] = frozenset()
