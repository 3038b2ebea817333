"""Stack configuration, read once into typed settings.

Components never read ``pulumi.Config``: this module reads every key of a stack (``Pulumi.<stack>.yaml``),
applies the documented defaults, and rejects a bad value with a message that names the key and says what to
set. The README's configuration table is written from this module.

It stays one file (over 500 lines) on purpose: :func:`read_settings` is the one reader of every ``tessera:``
key, the single place the README's table is written from; its parsers (``_as_int``, ``_cidrs``,
``_catalog_public``...) are private steps of that one reading and share its ``ConfigError`` and ``pulumi
config set`` hints. Moving the catalog's keys elsewhere would split that table, not separate a concern.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The NVIDIA families (what the worker fleet's GPU services can run on) are the accelerator table's, which
# the training instance reads too.
from infra.accelerators import NVIDIA_FAMILIES

LAYERS = ("all", "data", "compute")

#: Families for CPU-only workers (and small helper instances).
CPU_FAMILIES = ("t3", "t3a", "t4g", "m5", "m6i", "m7i", "c5", "c6i", "c7i", "r6i", "r7i")
#: The trainer images there are (infra/trainer_images.py builds them; a test keeps the two lists equal).
TRAINER_VARIANTS = ("cuda13", "cuda12", "gaudi")


class ConfigError(ValueError):
    """A stack configuration value is missing or wrong; the message says which key and what to set."""


Getter = Callable[[str], str | None]


def _hint(key: str, example: str) -> str:
    return f"set it with: pulumi config set {key} {example}"


@dataclass(frozen=True)
class FleetSettings:
    """One worker fleet (an Auto Scaling group running one service's container)."""

    instance_type: str
    max_size: int
    backlog_per_instance: int = 20


@dataclass(frozen=True)
class CatalogPublicSettings:
    """The sight catalog's opt-in public HTTPS listener (infra/catalog.py): all three keys, or none."""

    certificate_arn: str
    domain: str
    allowed_cidrs: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """Every setting of one stack, with defaults applied and values validated."""

    stack: str
    region: str
    layer: str = "all"
    environment: str = "dev"
    #: Throw-away stacks may lose data on destroy (no protect, force-destroy buckets, no final snapshot).
    throwaway: bool = False
    vpc_cidr: str = "10.40.0.0/16"
    az_count: int = 2
    nat_per_az: bool = False
    jump_host_allowed_cidrs: tuple[str, ...] = ()
    jump_host_public_key: str = ""
    jump_host_instance_type: str = "t3.micro"
    db_instance_class: str = "db.t4g.micro"
    db_allocated_storage_gb: int = 20
    #: Ceiling storage autoscaling may grow the database to (default: the larger of 100 and twice the start).
    db_max_allocated_storage_gb: int = 100
    db_backup_retention_days: int = 7
    db_multi_az: bool = False
    queue_max_receive_count: int = 3
    fleets: Mapping[str, FleetSettings] = field(default_factory=dict)
    training_enabled: bool = True
    training_instance_type: str = "p3.2xlarge"
    training_data_volume_gb: int = 500
    training_idle_minutes: int = 15
    grafana_instance_type: str = "t3.small"
    #: The sight catalog's refresher, one instance (its API is the ``sight-catalog`` fleet).
    catalog_refresher_instance_type: str = "t3.small"
    #: The sight catalog's public HTTPS listener; None: reachable through the jump host only.
    catalog_public: CatalogPublicSettings | None = None
    #: The catalog's Amazon Rekognition Custom Labels models, city slug -> model version ARN: the refresher
    #: may call DetectCustomLabels on exactly these (``tessera:catalogRekognitionModels``); none by default.
    catalog_rekognition_models: tuple[tuple[str, str], ...] = ()
    log_retention_days: int = 30
    build_images: bool = True
    #: Image name -> ``registry/repo@sha256:...`` built and pushed by CI: run as is, never built here.
    image_refs: Mapping[str, str] = field(default_factory=dict)
    #: Trainer variants the data layer builds (``tessera:trainerVariants``); empty: the default, the variant
    #: of ``training_instance_type`` where the stack holds compute too, every variant in a data-only stack.
    trainer_variants: tuple[str, ...] = ()
    #: A pinned AMI for the training instance (``tessera:trainingAmiId``); None looks up the newest AWS Deep
    #: Learning AMI whose driver fits the trainer image (see infra/training.py).
    training_ami_id: str | None = None
    data_stack: str | None = None

    @property
    def protect_data(self) -> bool:
        """Data stores carry ``protect``, deletion protection and final snapshots unless throw-away."""
        return not self.throwaway

    @property
    def has_data(self) -> bool:
        """This stack holds the data layer (network, buckets, database, queues, registry)."""
        return self.layer in ("all", "data")

    @property
    def has_compute(self) -> bool:
        """This stack holds the compute layer (fleets, training, jump host, Grafana)."""
        return self.layer in ("all", "compute")

    @property
    def catalog_enabled(self) -> bool:
        """The sight catalog runs: its fleet may have instances (``tessera:fleets.sight-catalog.maxSize``)."""
        fleet = self.fleets.get(CATALOG)
        return fleet is not None and fleet.max_size > 0


#: The sight catalog: its API is a fleet behind a load balancer, scaled on CPU (not on a queue backlog), with
#: a refresher instance beside it (infra/catalog.py); ``maxSize`` 0 leaves the whole catalog out.
CATALOG = "sight-catalog"

#: Default fleets: the model runner on GPUs; the sky generator and the FITS classifier on CPUs. Stellarium
#: renders with Mesa's software OpenGL, and a frame waits its settle time whatever draws it, so a GPU buys
#: little per frame: per dollar a c6i.large wins (bench/sky_render.py, bench/README.md). The catalog's API
#: serves people, not a queue: one burstable t3.small, a second when CPU runs high.
DEFAULT_FLEETS: dict[str, FleetSettings] = {
    "model-runner": FleetSettings("g5.xlarge", 4),
    "sky-generator": FleetSettings("c6i.large", 8, backlog_per_instance=4),
    "fits-classifier": FleetSettings("c6i.large", 2),
    CATALOG: FleetSettings("t3.small", 2),
}
GPU_FLEETS = ("model-runner",)


def _family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def _as_bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ConfigError(f"{key} must be true or false, got {raw!r}; {_hint(key, 'true')}")


def _as_int(key: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{key} must be from {low} to {high}, got {value}; {_hint(key, str(low))}")
    return value


def _as_json(key: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{key} must be structured YAML/JSON (a list or a map), got {raw!r}") from None


def _instance_type(key: str, value: str, families: tuple[str, ...], what: str) -> str:
    if "." not in value or _family(value) not in families:
        raise ConfigError(
            f"{key}: unknown instance family {_family(value)!r} in {value!r} for {what}; "
            f"use one of the families {', '.join(families)} (e.g. {families[0]}.xlarge)"
        )
    return value


def _cidrs(
    key: str,
    raw: str,
    *,
    example: str = "198.51.100.7/32",
    refuse: Callable[[ipaddress.IPv4Network | ipaddress.IPv6Network], str | None] | None = None,
) -> tuple[str, ...]:
    """A non-empty list of CIDR blocks (JSON, or one block); ``refuse(net)`` says why a block is not
    allowed here, or None."""
    value = _as_json(key, raw) if raw.strip().startswith("[") else [raw]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list of CIDRs, e.g. ['{example}']")
    cidrs = []
    for item in value:
        try:
            net = ipaddress.ip_network(str(item), strict=True)
        except ValueError as exc:
            raise ConfigError(f"{key}: {item!r} is not a valid CIDR ({exc}); write e.g. {example}") from None
        reason = refuse(net) if refuse is not None else None
        if reason:
            raise ConfigError(f"{key}: {item} {reason}")
        cidrs.append(str(net))
    return tuple(cidrs)


def _fleets(key: str, raw: str | None) -> dict[str, FleetSettings]:
    fleets = dict(DEFAULT_FLEETS)
    if raw is None:
        return fleets
    value = _as_json(key, raw)
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a map of service name to {{instanceType, maxSize}}")
    for service, spec in value.items():
        if service not in DEFAULT_FLEETS:
            raise ConfigError(f"{key}: unknown fleet {service!r}; fleets are {', '.join(DEFAULT_FLEETS)}")
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}.{service} must be a map with instanceType and/or maxSize")
        unknown = set(spec) - {"instanceType", "maxSize", "backlogPerInstance"}
        if unknown:
            raise ConfigError(
                f"{key}.{service}: unknown settings {sorted(unknown)}; use instanceType, maxSize, "
                "backlogPerInstance"
            )
        if service == CATALOG and "backlogPerInstance" in spec:
            raise ConfigError(
                f"{key}.{service}.backlogPerInstance: the catalog's API serves people, not a queue, and "
                "scales on CPU; set instanceType and maxSize only (maxSize 0 leaves the catalog out)"
            )
        base = fleets[service]
        # A CPU service's fleet boots the plain Amazon Linux image: a GPU instance would idle without its
        # driver (and cost 3-10x), so only CPU families are offered to it.
        families = NVIDIA_FAMILIES if service in GPU_FLEETS else CPU_FAMILIES
        what = "a GPU service (NVIDIA instance)" if service in GPU_FLEETS else "a CPU service (no GPU driver)"
        fleets[service] = FleetSettings(
            instance_type=_instance_type(
                f"{key}.{service}.instanceType",
                str(spec.get("instanceType", base.instance_type)),
                families,
                what,
            ),
            max_size=_as_int(f"{key}.{service}.maxSize", str(spec.get("maxSize", base.max_size)), 0, 100),
            backlog_per_instance=_as_int(
                f"{key}.{service}.backlogPerInstance",
                str(spec.get("backlogPerInstance", base.backlog_per_instance)),
                1,
                10_000,
            ),
        )
    return fleets


def _vpc_cidr(key: str, raw: str) -> str:
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise ConfigError(
            f"{key}: {raw!r} is not a valid CIDR ({exc}); {_hint(key, '10.40.0.0/16')}"
        ) from None
    if not (net.version == 4 and net.is_private and 16 <= net.prefixlen <= 24):
        raise ConfigError(
            f"{key}: {raw} must be a private IPv4 range (RFC 1918) from /16 to /24; "
            f"{_hint(key, '10.40.0.0/16')}"
        )
    return str(net)


def read_settings(get: Getter, stack: str, accelerator_families: tuple[str, ...] = ()) -> Settings:
    """Read and validate a stack's settings. ``get("tessera:key")`` returns the raw value or None when unset.

    ``accelerator_families`` are the instance families the training component accepts (it owns that table).
    """

    def opt(key: str) -> str | None:
        value = get(key)
        return None if value is None or value == "" else value

    def need(key: str, example: str, why: str) -> str:
        value = opt(key)
        if value is None:
            raise ConfigError(f"{key} is required ({why}); {_hint(key, example)}")
        return value

    region = need("aws:region", "us-east-1", "the AWS region to deploy to")
    layer = opt("tessera:layer") or "all"
    if layer not in LAYERS:
        raise ConfigError(f"tessera:layer must be one of {', '.join(LAYERS)}, got {layer!r}")

    defaults = Settings(stack=stack, region=region)
    raw_int = {
        "tessera:azCount": (2, 6, defaults.az_count),
        "tessera:dbAllocatedStorageGb": (20, 65536, defaults.db_allocated_storage_gb),
        "tessera:dbBackupRetentionDays": (1, 35, defaults.db_backup_retention_days),
        "tessera:queueMaxReceiveCount": (1, 1000, defaults.queue_max_receive_count),
        "tessera:trainingDataVolumeGb": (1, 16384, defaults.training_data_volume_gb),
        "tessera:trainingIdleMinutes": (5, 1440, defaults.training_idle_minutes),
        "tessera:logRetentionDays": (1, 3653, defaults.log_retention_days),
    }
    ints = {}
    for key, (low, high, default) in raw_int.items():
        raw = opt(key)
        ints[key] = default if raw is None else _as_int(key, raw, low, high)

    def flag(key: str, default: bool) -> bool:
        raw = opt(key)
        return default if raw is None else _as_bool(key, raw)

    has_compute = layer in ("all", "compute")
    jump_cidrs: tuple[str, ...] = ()
    public_key = ""
    if has_compute:
        jump_cidrs = _cidrs(
            "tessera:jumpHostAllowedCidrs",
            need(
                "tessera:jumpHostAllowedCidrs",
                "--path 'jumpHostAllowedCidrs[0]' 198.51.100.7/32",
                "the only addresses allowed to SSH to the jump host; there is no default",
            ),
            refuse=lambda net: (
                "would open SSH to the whole internet; list only your office or VPN addresses, e.g. "
                "198.51.100.7/32"
                if net.prefixlen == 0
                else None
            ),
        )
        public_key = need(
            "tessera:jumpHostPublicKey",
            '"$(cat ~/.ssh/id_ed25519.pub)"',
            "the OpenSSH public key installed on the jump host",
        ).strip()

    data_stack = opt("tessera:dataStack")
    if layer == "compute" and data_stack is None:
        raise ConfigError(
            "tessera:dataStack is required when tessera:layer is compute (the stack holding the data layer); "
            + _hint("tessera:dataStack", "myorg/tessera/prod-data")
        )

    fleets = _fleets("tessera:fleets", opt("tessera:fleets"))
    catalog_public = _catalog_public(opt, region, has_compute, fleets)
    rekognition_models = _rekognition_models(opt("tessera:catalogRekognitionModels"), region, has_compute)

    training_type = opt("tessera:trainingInstanceType") or defaults.training_instance_type
    if accelerator_families:
        training_type = _instance_type(
            "tessera:trainingInstanceType", training_type, accelerator_families, "a training instance"
        )

    return Settings(
        stack=stack,
        region=region,
        layer=layer,
        environment=opt("tessera:environment") or stack,
        throwaway=flag("tessera:throwaway", False),
        vpc_cidr=_vpc_cidr("tessera:vpcCidr", opt("tessera:vpcCidr") or defaults.vpc_cidr),
        az_count=ints["tessera:azCount"],
        nat_per_az=flag("tessera:natPerAz", False),
        jump_host_allowed_cidrs=jump_cidrs,
        jump_host_public_key=public_key,
        jump_host_instance_type=_instance_type(
            "tessera:jumpHostInstanceType",
            opt("tessera:jumpHostInstanceType") or defaults.jump_host_instance_type,
            CPU_FAMILIES,
            "the jump host",
        ),
        db_instance_class=_db_class(opt("tessera:dbInstanceClass") or defaults.db_instance_class),
        db_allocated_storage_gb=ints["tessera:dbAllocatedStorageGb"],
        db_max_allocated_storage_gb=_db_max_storage(
            opt("tessera:dbMaxAllocatedStorageGb"), ints["tessera:dbAllocatedStorageGb"]
        ),
        db_backup_retention_days=ints["tessera:dbBackupRetentionDays"],
        db_multi_az=flag("tessera:dbMultiAz", False),
        queue_max_receive_count=ints["tessera:queueMaxReceiveCount"],
        fleets=fleets,
        training_enabled=flag("tessera:trainingEnabled", True),
        training_instance_type=training_type,
        training_data_volume_gb=ints["tessera:trainingDataVolumeGb"],
        training_idle_minutes=ints["tessera:trainingIdleMinutes"],
        grafana_instance_type=_instance_type(
            "tessera:grafanaInstanceType",
            opt("tessera:grafanaInstanceType") or defaults.grafana_instance_type,
            CPU_FAMILIES,
            "Grafana",
        ),
        catalog_refresher_instance_type=_instance_type(
            "tessera:catalogRefresherInstanceType",
            opt("tessera:catalogRefresherInstanceType") or defaults.catalog_refresher_instance_type,
            CPU_FAMILIES,
            "the sight catalog's refresher",
        ),
        catalog_public=catalog_public,
        catalog_rekognition_models=rekognition_models,
        log_retention_days=ints["tessera:logRetentionDays"],
        build_images=flag("tessera:buildImages", True),
        image_refs=_image_refs("tessera:imageRefs", opt("tessera:imageRefs")),
        trainer_variants=_trainer_variants("tessera:trainerVariants", opt("tessera:trainerVariants"), layer),
        training_ami_id=_ami_id("tessera:trainingAmiId", opt("tessera:trainingAmiId")),
        data_stack=data_stack,
    )


_CERTIFICATE_ARN = re.compile(r"^arn:aws[a-z-]*:acm:([a-z0-9-]+):\d{12}:certificate/[0-9a-f-]{36}$")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_PUBLIC_KEYS = ("tessera:catalogCertificateArn", "tessera:catalogDomain", "tessera:catalogPublicCidrs")


_REKOGNITION_MODEL = re.compile(
    r"^arn:aws[a-z-]*:rekognition:([a-z0-9-]+):\d{12}:project/[A-Za-z0-9_.-]{1,255}/version/"
    r"[A-Za-z0-9_.-]{1,255}/\d{13}$"
)
_CITY_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _rekognition_models(text: str | None, region: str, has_compute: bool) -> tuple[tuple[str, str], ...]:
    """``tessera:catalogRekognitionModels``: a JSON object, city slug -> Custom Labels model version ARN in
    the stack's region."""
    key = "tessera:catalogRekognitionModels"
    if not text:
        return ()
    if not has_compute:
        raise ConfigError(f"{key}: the catalog runs in the stack holding the compute layer; set it there")
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f'{key}: not JSON ({exc}); give an object such as {{"paris": "arn:..."}}') from None
    if not isinstance(given, dict):
        raise ConfigError(f"{key}: give an object, city slug -> Rekognition Custom Labels model version ARN")
    models = []
    for slug, arn in sorted(given.items()):
        if not isinstance(slug, str) or not _CITY_SLUG.match(slug):
            raise ConfigError(
                f"{key}.{slug}: a city slug is lowercase letters, digits and '-' (e.g. sao-paulo)"
            )
        found = _REKOGNITION_MODEL.match(str(arn)) if isinstance(arn, str) else None
        if found is None:
            raise ConfigError(
                f"{key}.{slug}: {arn!r} is not a Custom Labels model version ARN "
                "(arn:aws:rekognition:REGION:ACCOUNT:project/NAME/version/NAME/TIMESTAMP)"
            )
        if found.group(1) != region:
            raise ConfigError(f"{key}.{slug}: the model is in {found.group(1)}, the stack in {region}")
        models.append((slug, str(arn)))
    return tuple(models)


def _catalog_public(
    opt: Callable[[str], str | None], region: str, has_compute: bool, fleets: Mapping[str, FleetSettings]
) -> CatalogPublicSettings | None:
    """The catalog's public HTTPS listener: a certificate, a domain and the CIDRs, all three or none."""
    given = {key: opt(key) for key in _PUBLIC_KEYS}
    if not any(given.values()):
        return None
    cert_key, domain_key, cidrs_key = _PUBLIC_KEYS
    if not has_compute:
        raise ConfigError(
            f"{', '.join(k for k, v in given.items() if v)}: the catalog's public listener belongs to the "
            "stack holding the compute layer; set it there instead"
        )
    fleet = fleets.get(CATALOG)
    if fleet is None or fleet.max_size == 0:
        raise ConfigError(
            f"{cert_key}: the catalog is left out (tessera:fleets.{CATALOG}.maxSize is 0), so it has no "
            "listener to make public; raise maxSize or unset the catalog's public settings"
        )
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} required too: the catalog's public HTTPS listener needs an ACM "
            "certificate in the stack's region, the domain it is for and the networks allowed to reach it; "
            + _hint(cidrs_key, f"--path '{cidrs_key.split(':')[1]}[0]' 198.51.100.0/24")
        )
    arn = str(given[cert_key]).strip()
    found = _CERTIFICATE_ARN.match(arn)
    if not found:
        raise ConfigError(
            f"{cert_key}: {arn!r} is not an ACM certificate ARN (arn:aws:acm:<region>:<account>:"
            "certificate/<id>); request or import the domain's certificate in ACM first"
        )
    if found.group(1) != region:
        raise ConfigError(
            f"{cert_key}: the certificate is in {found.group(1)} and the stack in {region}; a load balancer "
            f"uses certificates of its own region only: request one in {region}"
        )
    domain = str(given[domain_key]).strip().lower().rstrip(".")
    if not _HOST_NAME.match(domain):
        raise ConfigError(
            f"{domain_key}: {given[domain_key]!r} is not a host name; write the name people open, e.g. "
            + _hint(domain_key, "catalog.example.org")
        )
    cidrs = _cidrs(
        cidrs_key,
        str(given[cidrs_key]),
        example="198.51.100.0/24",
        refuse=lambda net: "is IPv6; the load balancer has IPv4 addresses only" if net.version != 4 else None,
    )
    return CatalogPublicSettings(certificate_arn=arn, domain=domain, allowed_cidrs=cidrs)


def _ami_id(key: str, raw: str | None) -> str | None:
    if raw is None:
        return None
    value = raw.strip()
    if not re.fullmatch(r"ami-[0-9a-f]{8}([0-9a-f]{9})?", value):
        raise ConfigError(
            f"{key}: {raw!r} is not an AMI id (ami- and 8 or 17 hex digits); "
            + _hint(key, "ami-0123456789abcdef0")
        )
    return value


def _trainer_variants(key: str, raw: str | None, layer: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if layer == "compute":
        raise ConfigError(
            f"{key} says which trainer images the data layer builds, and this stack holds only the compute "
            "layer: set it on the data stack (tessera:dataStack) instead"
        )
    value = _as_json(key, raw) if raw.strip().startswith("[") else [raw]
    example = f"--path '{key}[0]' gaudi"
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{key} must be a non-empty list of {', '.join(TRAINER_VARIANTS)}; {_hint(key, example)}"
        )
    unknown = [v for v in value if v not in TRAINER_VARIANTS]
    if unknown:
        raise ConfigError(
            f"{key}: unknown trainer variant(s) {', '.join(map(repr, unknown))}; the variants are "
            f"{', '.join(TRAINER_VARIANTS)} (cuda13: Turing and newer, cuda12: Volta p3/p3dn, gaudi: dl1)"
        )
    return tuple(v for v in TRAINER_VARIANTS if v in value)


def _image_refs(key: str, raw: str | None) -> dict[str, str]:
    if raw is None:
        return {}
    value = _as_json(key, raw)
    example = "--path 'imageRefs.trainer' 123456789012.dkr.ecr.us-east-1.amazonaws.com/repo@sha256:<64 hex>"
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be an object of image name -> digest reference; {_hint(key, example)}")
    digest = re.compile(r"^[a-z0-9][a-z0-9.-]*(?::[0-9]+)?/[a-z0-9][a-z0-9._/-]*@sha256:[0-9a-f]{64}$")
    for image, ref in value.items():
        if not isinstance(ref, str) or not digest.match(ref):
            raise ConfigError(
                f"{key}.{image}: {ref!r} is not a digest reference (registry/repository@sha256:<64 hex>); "
                f"a tag can move, a digest cannot; {_hint(key, example)}"
            )
    return {str(k): v for k, v in value.items()}


def _db_max_storage(raw: str | None, allocated: int) -> int:
    key = "tessera:dbMaxAllocatedStorageGb"
    if raw is None:
        return min(65536, max(100, 2 * allocated))
    value = _as_int(key, raw, 20, 65536)
    if value < allocated:
        raise ConfigError(
            f"{key}={value} is below tessera:dbAllocatedStorageGb={allocated}: storage autoscaling cannot "
            f"shrink the database; {_hint(key, str(max(100, 2 * allocated)))}"
        )
    return value


def _db_class(value: str) -> str:
    if not value.startswith("db.") or value.count(".") != 2:
        raise ConfigError(
            f"tessera:dbInstanceClass: {value!r} is not an RDS instance class; "
            + _hint("tessera:dbInstanceClass", "db.t4g.micro")
        )
    return value


def getter_from_mapping(config: Mapping[str, Any]) -> Getter:
    """A getter over a ``Pulumi.<stack>.yaml`` config map (structured values are passed on as JSON)."""

    def get(key: str) -> str | None:
        if key not in config:
            return None
        value = config[key]
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else json.dumps(value)

    return get
