"""Run the Pulumi program offline, under Pulumi's mocks, and record every resource it declares.

This is what `tessera plan` and the infrastructure tests share: no Pulumi CLI, no provider plugins, no AWS
account. The mocks answer the few provider calls the program makes (availability zones, AMI look-ups, the
caller identity, an ECR token) and give each resource the outputs a real provider would (ARNs, URLs,
endpoints), so that policies and stack outputs are built from realistic values.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime.config import set_all_config
from pulumi.runtime.settings import SETTINGS
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

ACCOUNT_ID = "123456789012"
DEFAULT_REGION = "us-east-1"


def _suffix(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:7]


@dataclass
class Declared:
    """One resource the program declared: its type token, logical name, inputs and mocked outputs."""

    type: str
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    custom: bool = True
    protect: bool = False
    parent: str | None = None
    parent_type: str | None = None
    #: The resources named in its ``depends_on`` option, as ``(type token, logical name)``.
    depends_on: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """An output (which includes every input) by its engine key (camelCase)."""
        return self.outputs.get(key, default)


@dataclass
class OfflineRun:
    """Everything one offline run of the program produced."""

    resources: list[Declared]
    outputs: dict[str, Any]
    mocks: TesseraMocks = field(repr=False)

    def of_type(self, type_token: str) -> list[Declared]:
        """Every custom resource of one type token, e.g. ``aws:s3/bucket:Bucket``."""
        return [r for r in self.resources if r.type == type_token]

    def named(self, type_token: str, name: str) -> Declared:
        """The one resource with this type and logical name."""
        for r in self.resources:
            if r.type == type_token and r.name == name:
                return r
        names = sorted(r.name for r in self.of_type(type_token))
        raise KeyError(f"no {type_token} named {name!r}; declared: {names}")

    def by_id(self, physical_id: str) -> Declared | None:
        """The resource whose mocked physical id is ``physical_id``."""
        for r in self.resources:
            if r.outputs.get("id") == physical_id:
                return r
        return None

    def ancestors(self, resource: Declared) -> list[Declared]:
        """The chain of parents of ``resource``, nearest first."""
        index: dict[tuple[str | None, str], Declared] = {(r.type, r.name): r for r in self.resources}
        chain: list[Declared] = []
        current = resource
        while current.parent is not None and (current.parent_type, current.parent) in index:
            current = index[(current.parent_type, current.parent)]
            chain.append(current)
        return chain

    def custom_resources(self) -> Iterator[Declared]:
        """Every provider resource (components left out)."""
        return (r for r in self.resources if r.custom)


class TesseraMocks(pulumi_mocks.Mocks):
    """Mocks that answer like AWS would, and record every resource declared.

    ``stack_outputs`` answers ``StackReference`` reads (the compute layer reads the data layer's outputs).
    """

    def __init__(
        self,
        region: str = DEFAULT_REGION,
        stack_outputs: Mapping[str, Any] | None = None,
        offerings: Mapping[str, Sequence[str]] | None = None,
    ):
        self.region = region
        self.stack_outputs = dict(stack_outputs or {})
        #: Instance type -> the zone names that offer it; a type not named here is offered in every zone
        #: (``tessera plan`` warns from stacks/capacity.toml instead of failing the offline run).
        self.offerings = {k: list(v) for k, v in (offerings or {}).items()}
        self.declared: list[Declared] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        #: Every string a provider function returned: values fetched at deploy time, not written in code.
        self.fetched_values: set[str] = set()

    # --- provider functions -------------------------------------------------------------------------
    def call(self, args: pulumi_mocks.MockCallArgs) -> dict:  # type: ignore[override]
        result = self._answer(args)
        self.fetched_values.update(v for v in result.values() if isinstance(v, str))
        return result

    def _answer(self, args: pulumi_mocks.MockCallArgs) -> dict:
        token = args.token
        self.calls.append((token, dict(args.args)))
        region = self.region
        if token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            names = [f"{region}{z}" for z in "abcdef"]
            return {"names": names, "zoneIds": [f"use1-az{i}" for i in range(1, 7)], "id": region}
        if token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {
                "accountId": ACCOUNT_ID,
                "arn": f"arn:aws:iam::{ACCOUNT_ID}:user/offline",
                "userId": "AIDAOFFLINE",
                "id": ACCOUNT_ID,
            }
        if token == "aws:index/getRegion:getRegion":
            return {"name": region, "region": region, "id": region, "endpoint": f"ec2.{region}.amazonaws.com"}
        if token == "aws:index/getPartition:getPartition":
            return {"partition": "aws", "dnsSuffix": "amazonaws.com", "id": "aws"}
        if token == "aws:ec2/getAmi:getAmi":
            digest = _suffix(json.dumps(args.args, sort_keys=True, default=str))
            return {"id": f"ami-0{digest}00000000", "architecture": "x86_64", "name": "offline-ami"}
        if token == "aws:ssm/getParameter:getParameter":
            digest = _suffix(str(args.args.get("name")))
            return {"value": f"ami-0{digest}00000000", "name": args.args.get("name"), "type": "String"}
        if token == "aws:ec2/getSubnet:getSubnet":
            subnet = str(args.args.get("id", "subnet"))
            zone = self.subnet_zone(subnet)
            return {"id": subnet, "availabilityZone": zone, "vpcId": "vpc-0", "cidrBlock": "10.0.9.0/24"}
        if token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            wanted = _filter_values(args.args, "instance-type")
            every = [f"{region}{z}" for z in "abcdef"]
            zones = sorted({z for t in wanted for z in self.offerings.get(t, every)})
            return {
                "id": region,
                "locations": zones,
                "locationTypes": ["availability-zone"] * len(zones),
                "instanceTypes": [wanted[0] if wanted else ""] * len(zones),
            }
        if token == "aws:ec2/getSubnets:getSubnets":
            ids = _filter_values(args.args, "subnet-id")
            wanted_zones = set(_filter_values(args.args, "availability-zone"))
            return {"id": region, "ids": [s for s in ids if self.subnet_zone(s) in wanted_zones]}
        if token == "aws:ecr/getAuthorizationToken:getAuthorizationToken":
            return {
                "userName": "AWS",
                "password": "offline-token",
                "authorizationToken": "QVdTOm9mZmxpbmUtdG9rZW4=",
                "proxyEndpoint": f"https://{ACCOUNT_ID}.dkr.ecr.{region}.amazonaws.com",
                "id": region,
            }
        return {}

    def subnet_zone(self, subnet_id: str) -> str:
        """The zone of a subnet: as declared when this run declared it, else stable per id (``getSubnet``)."""
        for r in self.declared:
            if r.type == "aws:ec2/subnet:Subnet" and r.outputs.get("id") == subnet_id:
                zone = r.inputs.get("availabilityZone")
                if zone:
                    return str(zone)
        return f"{self.region}{'abc'[int(_suffix(subnet_id), 16) % 3]}"

    # --- resources ----------------------------------------------------------------------------------
    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str | None, dict]:
        typ, name = args.typ, args.name
        state: dict[str, Any] = dict(args.inputs)
        physical = state.get("name") or f"{name}-{_suffix(typ + name)}"
        resource_id = f"{name}-{_suffix(typ + name)}"
        service = typ.split(":")[1].split("/")[0] if ":" in typ else "unknown"
        state.setdefault("arn", f"arn:aws:{service}:{self.region}:{ACCOUNT_ID}:{physical}")
        state.update(self._outputs_for(typ, name, physical, state))
        if args.custom:
            # What AWS gives an auto-named resource; ignored by types that have no name property.
            state.setdefault("name", physical)
        if typ == "pulumi:pulumi:StackReference":
            wanted = str(state.get("name", name))
            state = {"name": wanted, "outputs": self.stack_outputs, "secretOutputNames": []}
            resource_id = wanted
        state.setdefault("id", resource_id)
        self.declared.append(Declared(typ, name, dict(args.inputs), state, bool(args.custom)))
        return state.get("id", resource_id), state

    def _outputs_for(self, typ: str, name: str, physical: str, state: dict[str, Any]) -> dict[str, Any]:
        region, acct = self.region, ACCOUNT_ID
        ip_octet = int(_suffix(name), 16) % 250 + 2
        if typ in ("aws:s3/bucket:Bucket", "aws:s3/bucketV2:BucketV2"):
            bucket = state.get("bucket") or f"{state.get('bucketPrefix', name)}{_suffix(name)}"
            return {
                "bucket": bucket,
                "id": bucket,
                "arn": f"arn:aws:s3:::{bucket}",
                "bucketRegionalDomainName": f"{bucket}.s3.{region}.amazonaws.com",
            }
        if typ == "aws:sqs/queue:Queue":
            queue = state.get("name") or f"{name}-{_suffix(name)}"
            url = f"https://sqs.{region}.amazonaws.com/{acct}/{queue}"
            return {"name": queue, "url": url, "id": url, "arn": f"arn:aws:sqs:{region}:{acct}:{queue}"}
        if typ == "aws:ecr/repository:Repository":
            repo = state.get("name") or physical
            return {
                "name": repo,
                "repositoryUrl": f"{acct}.dkr.ecr.{region}.amazonaws.com/{repo}",
                "registryId": acct,
                "arn": f"arn:aws:ecr:{region}:{acct}:repository/{repo}",
            }
        if typ == "aws:iam/role:Role":
            return {
                "name": physical,
                "arn": f"arn:aws:iam::{acct}:role/{physical}",
                "uniqueId": "AROAOFFLINE",
            }
        if typ == "aws:iam/policy:Policy":
            return {"name": physical, "arn": f"arn:aws:iam::{acct}:policy/{physical}"}
        if typ == "aws:iam/instanceProfile:InstanceProfile":
            return {"name": physical, "arn": f"arn:aws:iam::{acct}:instance-profile/{physical}"}
        if typ == "aws:kms/key:Key":
            key_id = f"{_suffix(name)}-0000-4000-8000-{_suffix(name + 'k')}00000"
            return {"keyId": key_id, "arn": f"arn:aws:kms:{region}:{acct}:key/{key_id}"}
        if typ == "aws:ec2/instance:Instance":
            out: dict[str, Any] = {
                "privateIp": f"10.0.1.{ip_octet}",
                "privateDns": f"ip-10-0-1-{ip_octet}.ec2.internal",
                "instanceState": "running",
                "arn": f"arn:aws:ec2:{region}:{acct}:instance/i-{_suffix(name)}",
                "id": f"i-0{_suffix(name)}{_suffix(name + 'i')}",
            }
            if state.get("associatePublicIpAddress"):
                out["publicIp"] = f"203.0.113.{ip_octet}"
                out["publicDns"] = f"ec2-203-0-113-{ip_octet}.compute-1.amazonaws.com"
            return out
        if typ == "aws:ec2/eip:Eip":
            return {"publicIp": f"198.51.100.{ip_octet}", "allocationId": f"eipalloc-{_suffix(name)}"}
        if typ == "aws:rds/instance:Instance":
            host = f"{state.get('identifier', physical)}.c0ffee.{region}.rds.amazonaws.com"
            port = int(state.get("port") or 5432)
            secrets = []
            if state.get("manageMasterUserPassword"):
                secrets = [
                    {
                        "secretArn": f"arn:aws:secretsmanager:{region}:{acct}:secret:rds!db-{_suffix(name)}",
                        "secretStatus": "active",
                        "kmsKeyId": state.get("masterUserSecretKmsKeyId", ""),
                    }
                ]
            return {
                "address": host,
                "endpoint": f"{host}:{port}",
                "port": port,
                "masterUserSecrets": secrets,
                "arn": f"arn:aws:rds:{region}:{acct}:db:{physical}",
                "resourceId": f"db-{_suffix(name).upper()}",
            }
        if typ == "aws:ec2/launchTemplate:LaunchTemplate":
            return {"latestVersion": 1, "defaultVersion": 1, "id": f"lt-0{_suffix(name)}"}
        if typ == "aws:autoscaling/group:Group":
            return {"name": state.get("name") or physical}
        if typ == "aws:cloudwatch/logGroup:LogGroup":
            group = state.get("name") or physical
            return {"name": group, "arn": f"arn:aws:logs:{region}:{acct}:log-group:{group}"}
        if typ == "aws:lambda/function:Function":
            fn = state.get("name") or physical
            return {"name": fn, "arn": f"arn:aws:lambda:{region}:{acct}:function:{fn}"}
        if typ in ("aws:lb/loadBalancer:LoadBalancer", "aws:lb/targetGroup:TargetGroup"):
            # ELB names are at most 32 characters; an internal load balancer's DNS name says so.
            elb = str(state.get("name") or physical)[:32]
            kind = "targetgroup" if typ.endswith(":TargetGroup") else "loadbalancer/app"
            arn = f"arn:aws:elasticloadbalancing:{region}:{acct}:{kind}/{elb}/{_suffix(name)}"
            if kind == "targetgroup":
                return {"arn": arn}
            scheme = "internal-" if state.get("internal") else ""
            return {
                "arn": arn,
                "dnsName": f"{scheme}{elb}-{int(_suffix(name), 16)}.{region}.elb.amazonaws.com",
                "zoneId": "Z35SXDOTRQ7X7K",
            }
        if typ == "aws:secretsmanager/secret:Secret":
            return {"arn": f"arn:aws:secretsmanager:{region}:{acct}:secret:{physical}-AbCdEf"}
        if typ == "docker:index/image:Image":
            image = state.get("imageName", name)
            digest = _suffix(json.dumps(state.get("build", {}), sort_keys=True, default=str)) * 9
            return {"repoDigest": f"{str(image).split(':')[0]}@sha256:{digest[:64]}"}
        if typ.startswith("aws:ec2/") and typ.endswith((":Vpc", ":Subnet", ":SecurityGroup")):
            prefix = {":Vpc": "vpc", ":Subnet": "subnet", ":SecurityGroup": "sg"}[typ[typ.rindex(":") :]]
            return {"id": f"{prefix}-0{_suffix(name)}{_suffix(name + 'x')}"}
        return {}


def _filter_values(args: Mapping[str, Any], name: str) -> list[str]:
    """The values of one ``filters`` entry of a provider function's arguments."""
    for item in args.get("filters") or []:
        if isinstance(item, Mapping) and item.get("name") == name:
            return [str(v) for v in item.get("values") or []]
    return []


def _config_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def load_stack_config(path: str) -> dict[str, Any]:
    """The ``config:`` map of a ``Pulumi.<stack>.yaml`` file (values as written: strings, lists, objects)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    config = doc.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a mapping of keys to values")
    return dict(config)


def run_offline(
    program: Callable[[], Mapping[str, Any] | None],
    *,
    config: Mapping[str, Any] | None = None,
    stack: str = "dev",
    project: str = "tessera",
    stack_outputs: Mapping[str, Any] | None = None,
    offerings: Mapping[str, Sequence[str]] | None = None,
) -> OfflineRun:
    """Run ``program`` under fresh mocks with ``config`` (``namespace:key`` -> value); return its resources.

    ``program`` returns the stack outputs (a mapping of names to values or Outputs); they come back resolved.
    Every call gets a new event loop and new mocks, so runs never leak into one another. ``offerings``
    (instance type -> zone names) restricts where the mocked AWS offers a type; others are offered everywhere.
    """
    config = dict(config or {})
    region = str(config.get("aws:region", DEFAULT_REGION))
    mocks = TesseraMocks(region=region, stack_outputs=stack_outputs, offerings=offerings)
    asyncio.set_event_loop(asyncio.new_event_loop())
    set_all_config({k: _config_value(v) for k, v in config.items()}, [])
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=False)

    constructed: list[tuple[str, str, pulumi.Resource]] = []

    parent_names: list[tuple[str, str, str | None, str | None]] = []
    dependencies: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}

    def record(args: pulumi.ResourceTransformationArgs) -> None:
        constructed.append((args.type_, args.name, args.resource))
        parent = args.opts.parent if args.opts is not None else None
        parent_type = getattr(parent, "_type", None) if parent is not None else None
        parent_names.append((args.type_, args.name, getattr(parent, "_name", None), parent_type))
        named = args.opts.depends_on if args.opts is not None else None
        if isinstance(named, pulumi.Resource):
            named = [named]
        if isinstance(named, list | tuple):
            dependencies[(args.type_, args.name)] = tuple(
                (str(getattr(d, "_type", "")), str(getattr(d, "_name", "")))
                for d in named
                if isinstance(d, pulumi.Resource)
            )

    pulumi.runtime.register_stack_transformation(record)
    resolved: dict[str, Any] = {}

    def body() -> Any:
        outputs = dict(program() or {})
        keys = list(outputs)

        def keep(values: list[Any]) -> None:
            resolved.update(zip(keys, values, strict=True))

        return pulumi.Output.all(*[outputs[k] for k in keys]).apply(keep)

    SETTINGS.rpc_manager.clear()
    SETTINGS.outputs.clear()
    try:
        _sync_await(run_pulumi_func(lambda: _sync_await(pulumi.Output.from_input(body()).future())))
    finally:
        asyncio.get_event_loop().close()

    protect = {(t, n): bool(getattr(r, "_protect", False)) for t, n, r in constructed}
    parents = {(t, n): (p_name, p_type) for t, n, p_name, p_type in parent_names}
    for d in mocks.declared:
        d.protect = protect.get((d.type, d.name), False)
        d.parent, d.parent_type = parents.get((d.type, d.name), (None, None))
        d.depends_on = dependencies.get((d.type, d.name), ())
    return OfflineRun(resources=mocks.declared, outputs=resolved, mocks=mocks)
