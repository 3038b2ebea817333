"""Where a request may make a service read, write and connect: the trust boundary of docs/ARCHITECTURE.md.

Whoever can send to a queue writes the requests on it, so a queued request is confined: its sources
(images, models) come from allowed S3 buckets or from under a configured local root, its outputs go to
allowed buckets or under a configured output root, and it may name only model endpoints the deployment
lists. GDAL's ``/vsi*`` paths (``/vsicurl?url=...`` reaches any URL), ``..``, URL query tricks, control
characters and oversized keys are refused whatever the policy.

A :class:`TrustPolicy` states these roots. Two kinds exist, and which one applies is always explicit:

- **queue** (``confined=True``), read by :meth:`TrustPolicy.from_environment` from the worker's environment:

  ``TESSERA_ALLOWED_BUCKETS``
      Comma-separated bucket names requests may read from and write to. Unset: the buckets the platform
      gives the service, i.e. every ``TESSERA_BUCKET_<PURPOSE>`` variable (``stacks/program.py`` and
      ``services/cloud/embedded.py`` set them), so the embedded demo's buckets are allowed as they are.
  ``TESSERA_LOCAL_ROOT``
      A directory whose files requests may read by path or ``file://``. Unset: no local file is read.
  ``TESSERA_OUTPUT_ROOT``
      A directory under which ``outputs.path`` may write (a ``.geojson`` file; subdirectories are made
      as needed). Unset: requests may not write local files.
  ``TESSERA_ENDPOINT_URLS``
      Comma-separated model endpoint URLs a request may name, matched exactly. Unset: none.

- **local** (``confined=False``, :meth:`TrustPolicy.local`): ``tessera run`` on the user's own machine, where
  the request's author is the user: any path, bucket or http(s) endpoint; only the checks on form apply.

:func:`policy_in_force` says which policy a document checker applies when it is not given one:
:class:`~services.jobs.queue_worker.QueueWorker` handles every message inside :func:`confined` with the
worker's queue policy; outside a worker it is the local policy.

The checks are small pure functions that return the value to use (a confined local path comes back
absolute, resolved under its root) or raise :class:`TrustError` saying what is wrong and how to fix it;
:meth:`~services.jobs.documents.DocumentChecker.trusted` files a refusal under the field's JSON path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

ALLOWED_BUCKETS_ENV = "TESSERA_ALLOWED_BUCKETS"
LOCAL_ROOT_ENV = "TESSERA_LOCAL_ROOT"
OUTPUT_ROOT_ENV = "TESSERA_OUTPUT_ROOT"
ENDPOINT_URLS_ENV = "TESSERA_ENDPOINT_URLS"
#: The platform names each bucket a service may use ``TESSERA_BUCKET_<PURPOSE>``.
BUCKET_ENV_PREFIX = "TESSERA_BUCKET_"

#: S3's own limit on a key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: Longest URL or path accepted at all.
MAX_TEXT = 2048
#: What an output prefix leaves room for: ``/<job id (128)>.geojson``.
OUTPUT_NAME_ROOM = 1 + 128 + len(".geojson")
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class TrustError(ValueError):
    """A value the policy does not accept; the message says why and what to write instead."""


@dataclass(frozen=True)
class TrustPolicy:
    """What requests may touch (see the module doc); frozen, built once per worker."""

    #: True for requests from a queue; False for ``tessera run`` (the user's own paths).
    confined: bool = True
    allowed_buckets: frozenset[str] = frozenset()
    local_root: Path | None = None
    output_root: Path | None = None
    endpoint_urls: frozenset[str] = frozenset()

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> TrustPolicy:
        """The queue policy of this deployment (the variables of the module doc)."""
        env = os.environ if env is None else env
        listed = env.get(ALLOWED_BUCKETS_ENV)
        if listed is not None:
            buckets = frozenset(_items(listed))
        else:
            buckets = frozenset(v for k, v in env.items() if k.startswith(BUCKET_ENV_PREFIX) and v)
        return cls(
            confined=True,
            allowed_buckets=buckets,
            local_root=_root(env.get(LOCAL_ROOT_ENV)),
            output_root=_root(env.get(OUTPUT_ROOT_ENV)),
            endpoint_urls=frozenset(_items(env.get(ENDPOINT_URLS_ENV, ""))),
        )

    @classmethod
    def local(cls) -> TrustPolicy:
        """The policy of ``tessera run``: the user's own paths, buckets and endpoints."""
        return cls(confined=False)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _root(value: str | None) -> Path | None:
    return Path(os.path.realpath(value)) if value and value.strip() else None


LOCAL = TrustPolicy.local()
_IN_FORCE: ContextVar[TrustPolicy] = ContextVar("tessera_trust_policy", default=LOCAL)


def policy_in_force() -> TrustPolicy:
    """The policy for documents checked now: the queue's inside :func:`confined`, else the local one."""
    return _IN_FORCE.get()


@contextmanager
def confined(policy: TrustPolicy) -> Iterator[TrustPolicy]:
    """Check every document inside the block (this thread or task) against ``policy``."""
    token = _IN_FORCE.set(policy)
    try:
        yield policy
    finally:
        _IN_FORCE.reset(token)


def _text(value: str, what: str) -> str:
    """``value`` stripped, once its form is sane (no control characters, not huge)."""
    if _CONTROL.search(value):
        raise TrustError(f"{what} holds a control character (NUL, newline...); write it as plain text")
    if len(value) > MAX_TEXT:
        raise TrustError(f"{what} is {len(value)} characters long; at most {MAX_TEXT} are accepted")
    return value.strip()


def _key_problem(key: str) -> str | None:
    """Why an S3 key (or prefix) cannot be used, or None."""
    if any(c in key for c in "?#\\%"):
        return "holds '?', '#', '%' or '\\' (URL tricks); name the object by its plain key"
    parts = key.split("/")
    if any(part in (".", "..") for part in parts):
        return "has a '.' or '..' segment; name the key without them"
    if any(part == "" for part in parts[:-1]):
        return "has an empty segment ('//'); write each '/' once"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"key is longer than S3's {MAX_KEY_BYTES} bytes"
    return None


def s3_location(url: str, policy: TrustPolicy, *, what: str, prefix: bool = False) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://`` URL the policy allows (``prefix``: the key may be empty)."""
    rest = _text(url, what)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not BUCKET_PATTERN.match(bucket):
        raise TrustError(
            f"{url[:80]!r} names no bucket (3-63 lower-case letters, digits, '.', '-'); "
            f"write s3://BUCKET/{'PREFIX' if prefix else 'KEY'}"
        )
    if not key and not prefix:
        raise TrustError(f"{url[:80]!r} names no object; write s3://BUCKET/KEY")
    problem = _key_problem(key.strip("/") if prefix else key)
    if problem:
        raise TrustError(f"{url[:80]!r}: the {'prefix' if prefix else 'key'} {problem}")
    if prefix and len(key.encode("utf-8")) > MAX_KEY_BYTES - OUTPUT_NAME_ROOM:
        raise TrustError(
            f"the prefix of {url[:64]!r}... is too long: "
            f"keep it under {MAX_KEY_BYTES - OUTPUT_NAME_ROOM} bytes"
        )
    if policy.confined and bucket not in policy.allowed_buckets:
        allowed = ", ".join(sorted(policy.allowed_buckets)) or "none"
        raise TrustError(
            f"bucket {bucket!r} is not one this deployment reads or writes (allowed: {allowed}); "
            f"use one of those, or add it to {ALLOWED_BUCKETS_ENV} on the worker"
        )
    return bucket, key


def source(value: str, policy: TrustPolicy, *, what: str) -> str:
    """An image or model source to read: ``s3://BUCKET/KEY``, or a local path / ``file://`` (confined: only
    under the local root, returned absolute). GDAL ``/vsi*`` paths and other schemes are refused."""
    text = _text(value, what)
    if text.startswith("s3://"):
        s3_location(text, policy, what=what)
        return text
    scheme = _SCHEME.match(text)
    if scheme:
        if scheme.group(1).lower() != "file":
            raise TrustError(
                f"{what} {text[:64]!r}: {scheme.group(1)}:// is not read; "
                "give a local path, file:// or s3:// URL"
            )
        parsed = urlsplit(text)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise TrustError(f"{what} {text!r} is not a local file URL; write file:///ABSOLUTE/PATH")
        text = parsed.path
    if text.lower().startswith("/vsi"):
        raise TrustError(
            f"{what} {text[:64]!r} is a GDAL virtual path (/vsi...), which can reach any URL or file; "
            "give s3://BUCKET/KEY or a file path"
        )
    if not policy.confined:
        return text
    if policy.local_root is None:
        raise TrustError(
            f"{what} {text[:64]!r}: queued requests may not read local files on this deployment; "
            f"give s3://BUCKET/KEY (or set {LOCAL_ROOT_ENV} on the worker)"
        )
    return str(_under(text, policy.local_root, what=what, env=LOCAL_ROOT_ENV))


def output_path(value: str, policy: TrustPolicy) -> str:
    """A local file to write the GeoJSON to (confined: a ``.geojson`` under the output root, returned
    absolute; a relative path is taken from the root)."""
    text = _text(value, "the output path")
    if not text:
        raise TrustError("the output path is empty; give a .geojson file path")
    if not policy.confined:
        return text
    if policy.output_root is None:
        raise TrustError(
            "queued requests may not write local files on this deployment; "
            f"use outputs.s3 (or set {OUTPUT_ROOT_ENV} on the worker)"
        )
    if text.lower().startswith("file:") or "://" in text:
        raise TrustError(f"{text[:64]!r} is not a file path; give a path under {policy.output_root}")
    path = _under(text, policy.output_root, what="the output path", env=OUTPUT_ROOT_ENV)
    if path.suffix.lower() != ".geojson":
        raise TrustError(f"{text[:64]!r} must name a .geojson file (under {policy.output_root})")
    return str(path)


def output_directory(value: str, policy: TrustPolicy) -> str:
    """A local directory a job writes many files under (confined: under the output root, returned
    absolute; a relative path is taken from the root)."""
    text = _text(value, "the output directory")
    if not text:
        raise TrustError("the output directory is empty; give s3://BUCKET/PREFIX or a directory")
    if not policy.confined:
        return text
    if policy.output_root is None:
        raise TrustError(
            "queued jobs may not write local files on this deployment; "
            f"give s3://BUCKET/PREFIX (or set {OUTPUT_ROOT_ENV} on the worker)"
        )
    if text.lower().startswith("file:") or "://" in text:
        raise TrustError(f"{text[:64]!r} is not a directory path; give a path under {policy.output_root}")
    return str(_under(text, policy.output_root, what="the output directory", env=OUTPUT_ROOT_ENV))


def output_s3(value: str, policy: TrustPolicy) -> str:
    """An ``s3://BUCKET[/PREFIX]`` the job's GeoJSON goes under (``<prefix>/<job_id>.geojson``)."""
    text = _text(value, "the output prefix")
    if not text.startswith("s3://"):
        raise TrustError(f"{text[:64]!r} is not an S3 URL; write s3://BUCKET or s3://BUCKET/PREFIX")
    s3_location(text, policy, what="the output prefix", prefix=True)
    return text


def endpoint_url(value: str, policy: TrustPolicy) -> str:
    """A model endpoint URL: http(s); from a queue, only one the deployment lists."""
    text = _text(value, "the endpoint URL")
    try:
        parsed = urlsplit(text)
    except ValueError:
        raise TrustError(f"{text[:64]!r} is not a URL; write http(s)://HOST[:PORT]/PATH") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TrustError(f"{text[:64]!r} must be an http:// or https:// URL with a host")
    if parsed.username is not None or parsed.password is not None:
        raise TrustError(
            "the endpoint URL carries credentials; configure them on the worker, not in requests"
        )
    if policy.confined and text not in policy.endpoint_urls:
        listed = ", ".join(sorted(policy.endpoint_urls)) or "none"
        raise TrustError(
            f"{text[:64]!r} is not a model endpoint this deployment allows (allowed: {listed}); "
            f"use one of those, or add it to {ENDPOINT_URLS_ENV} on the worker"
        )
    return text


def _under(text: str, root: Path, *, what: str, env: str) -> Path:
    """``text`` as an absolute path inside ``root`` (relative paths start at the root); symbolic links are
    followed, so a link inside the root that points out of it is refused too."""
    pure = PurePosixPath(text)
    if ".." in pure.parts:
        raise TrustError(f"{what} {text[:64]!r} has a '..' segment; give a path under {root}")
    joined = Path(os.path.normpath(root / pure))  # an absolute ``pure`` replaces the root
    resolved = Path(os.path.realpath(joined))
    if resolved == root or root not in resolved.parents:
        raise TrustError(f"{what} {text[:64]!r} is not under {root} ({env}); give a path under it")
    return resolved
