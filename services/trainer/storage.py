"""Where a job's files live (an S3 prefix or a local directory) and where its dataset is read from.

:class:`Storage` is the job's output: checkpoints, the model, curves, logs. Every write is atomic (a local
write to a temporary name then ``os.replace``; on S3 one PUT), so a reader never sees half a file.
:func:`fetch_dataset` stages an S3 dataset prefix into a local cache and hands the task a directory.

S3 is the truth for datasets and checkpoints; the training box's data volume (``TESSERA_DATA_DIR``, ``/data``)
is a cache of both, so that a box stopped and started again, or a second job on the same dataset, does not
pay for the download again:

- datasets are staged under ``$TESSERA_DATA_DIR/datasets/<bucket>/<prefix>`` (``TESSERA_TRAINER_CACHE``
  overrides the place). A manifest per dataset records each object's ETag: an object is downloaded again only
  when it changed, a file whose object is gone is removed, and the datasets used least recently are evicted
  when the volume lacks room for the next one;
- checkpoints a job writes to S3 are also kept under ``$TESSERA_DATA_DIR/checkpoints`` (the latest per job,
  :class:`CachedStorage`), and a resume reads that copy when its ETag still matches the object in S3.

Without ``TESSERA_DATA_DIR`` (a laptop, CI) datasets go to a temporary directory and checkpoints are not
cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from services.cloud import objects
from services.errors import UserError

log = logging.getLogger(__name__)

#: The dataset word that means "generate the data" (tasks that can, e.g. the detector).
SYNTHETIC = "synthetic"
CACHE_ENV = "TESSERA_TRAINER_CACHE"
DATA_DIR_ENV = "TESSERA_DATA_DIR"
"""The training box's data volume (set by its start script): the dataset and checkpoint cache live there."""
MANIFESTS = ".manifests"
"""Per-dataset manifests (object ETags, last use) in the dataset cache (no bucket name starts with a dot)."""
FREE_MARGIN_BYTES = 1 << 30
"""Room left free on the cache's volume after staging (logs, temporary files, the checkpoint cache)."""


class Storage(Protocol):
    """A job's output location; names are relative (``checkpoints/latest.json``)."""

    def uri(self, name: str) -> str:
        """The URI (or path) of ``name``."""
        ...

    def put_file(self, local: Path, name: str) -> str:
        """Store a local file as ``name`` atomically; returns its URI."""
        ...

    def put_bytes(self, body: bytes, name: str) -> str:
        """Store bytes as ``name`` atomically; returns its URI."""
        ...

    def get_bytes(self, name: str) -> bytes | None:
        """The bytes of ``name``, or None when it does not exist."""
        ...

    def get_file(self, name: str, local: Path) -> bool:
        """Copy ``name`` to ``local``; False when it does not exist."""
        ...


class LocalStorage:
    """Output in a local directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def uri(self, name: str) -> str:
        return str((self.root / name).resolve())

    def put_file(self, local: Path, name: str) -> str:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != target.resolve():
            temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.copyfile(local, temporary)
            os.replace(temporary, target)
        return self.uri(name)

    def put_bytes(self, body: bytes, name: str) -> str:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        temporary.write_bytes(body)
        os.replace(temporary, target)
        return self.uri(name)

    def get_bytes(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def get_file(self, name: str, local: Path) -> bool:
        path = self.root / name
        if not path.is_file():
            return False
        if path.resolve() != Path(local).resolve():
            shutil.copyfile(path, local)
        return True


class S3Storage:
    """Output under an S3 prefix."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.bucket, prefix = objects.split_s3_url(url)
        self.prefix = prefix.strip("/")
        self.client = client or objects.s3_client()

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{objects.join_key(self.prefix, name)}"

    def put_file(self, local: Path, name: str) -> str:
        objects.upload_file(local, self.uri(name), client=self.client)
        return self.uri(name)

    def put_bytes(self, body: bytes, name: str) -> str:
        objects.write_object(self.uri(name), body, client=self.client)
        return self.uri(name)

    def get_bytes(self, name: str) -> bytes | None:
        try:
            return objects.read_object(self.uri(name), self.client)
        except UserError:
            return None

    def get_file(self, name: str, local: Path) -> bool:
        body = self.get_bytes(name)
        if body is None:
            return False
        Path(local).write_bytes(body)
        return True

    def fingerprint(self, name: str) -> str | None:
        """The ETag of ``name`` (changes whenever its content does), or None when it does not exist."""
        try:
            return objects.object_etag(self.uri(name), self.client)
        except UserError:
            return None


class CachedStorage:
    """S3 output whose checkpoints (names under ``cached_prefix``) are also kept in a local directory.

    Writes go to S3 as always, and the file written is kept in ``cache_dir`` with the ETag S3 gave it (only
    the latest one: older checkpoints are dropped from the cache). A read of a cached name uses the local copy
    when its ETag still matches the object in S3, and downloads (and caches) it otherwise. Caching never
    fails a job: a cache that cannot be written is logged and S3 is used.
    """

    def __init__(self, inner: S3Storage, cache_dir: Path, cached_prefix: str = "checkpoints/") -> None:
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.cached_prefix = cached_prefix

    def uri(self, name: str) -> str:
        return self.inner.uri(name)

    def put_bytes(self, body: bytes, name: str) -> str:
        return self.inner.put_bytes(body, name)

    def get_bytes(self, name: str) -> bytes | None:
        return self.inner.get_bytes(name)

    def put_file(self, local: Path, name: str) -> str:
        uri = self.inner.put_file(local, name)
        if name.startswith(self.cached_prefix):
            self._keep(Path(local), name, self.inner.fingerprint(name))
        return uri

    def get_file(self, name: str, local: Path) -> bool:
        if not name.startswith(self.cached_prefix):
            return self.inner.get_file(name, local)
        etag = self.inner.fingerprint(name)
        if etag is None:
            return False
        cached = self.cache_dir / name
        if cached.is_file() and _read_json(_etag_file(cached)).get("etag") == etag:
            log.info("reading %s from the local cache %s (it matches S3)", self.uri(name), cached)
            if cached.resolve() != Path(local).resolve():
                shutil.copyfile(cached, local)
            return True
        if not self.inner.get_file(name, local):
            return False
        self._keep(Path(local), name, etag)
        return True

    def _keep(self, local: Path, name: str, etag: str | None) -> None:
        if etag is None:
            return
        target = self.cache_dir / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            try:
                os.link(local, temporary)  # the same volume: no copy
            except OSError:
                shutil.copyfile(local, temporary)
            os.replace(temporary, target)
            _write_json(_etag_file(target), {"etag": etag, "uri": self.uri(name)})
            for other in target.parent.iterdir():  # only the latest checkpoint is worth a place on the disk
                if other.name not in (target.name, _etag_file(target).name) and not other.name.startswith(
                    "."
                ):
                    other.unlink(missing_ok=True)
                    _etag_file(other).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not cache %s in %s (%s); S3 has it", name, target, exc)


def _etag_file(cached: Path) -> Path:
    return cached.with_name(f".{cached.name}.etag.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data), encoding="utf-8")
    os.replace(temporary, path)


def data_dir() -> Path | None:
    """The training box's data volume (``$TESSERA_DATA_DIR``), or None off the box."""
    configured = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(configured) if configured else None


def storage_for(output: str, client: Any = None) -> Storage:
    """The storage an output location names: ``s3://bucket/prefix`` or a local directory.

    On a training box (``$TESSERA_DATA_DIR``), S3 checkpoints are also cached on its data volume.
    """
    if output.startswith("s3://"):
        storage = S3Storage(output, client)
        volume = data_dir()
        if volume is None:
            return storage
        digest = hashlib.sha256(storage.uri("").encode()).hexdigest()[:24]
        return CachedStorage(storage, volume / "checkpoints" / digest)
    return LocalStorage(output)


def cache_root() -> Path:
    """Where S3 datasets are staged: ``$TESSERA_TRAINER_CACHE``, else ``$TESSERA_DATA_DIR/datasets``, else a
    temporary directory."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    volume = data_dir()
    if volume is not None:
        return volume / "datasets"
    import tempfile

    return Path(tempfile.gettempdir()) / "tessera-datasets"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (the processes of one multi-device job stage the same dataset)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_fresh(target: Path, recorded: Any, size: int, etag: str) -> bool:
    """True when the staged file is the object's current version (same ETag, same size)."""
    return (
        isinstance(recorded, dict)
        and recorded.get("etag") == etag
        and recorded.get("size") == size
        and target.is_file()
        and target.stat().st_size == size
    )


def _evict_for(root: Path, needed: int, keep: Path) -> None:
    """Remove the datasets used least recently until ``needed`` bytes (plus a margin) fit on the volume.

    Raises UserError when even an empty cache would be too small.
    """
    if needed <= 0:
        return
    manifests = sorted(
        (m for m in (root / MANIFESTS).glob("*.json") if m != keep), key=lambda m: m.stat().st_mtime
    )
    while shutil.disk_usage(root).free < needed + FREE_MARGIN_BYTES:
        if not manifests:
            free = shutil.disk_usage(root).free
            raise UserError(
                f"the dataset needs {needed / 1e9:.1f} GB more than is staged, and the data volume at "
                f"{root} has {free / 1e9:.1f} GB free with nothing left to evict: grow the volume "
                "(tessera:trainingDataVolumeGb) or train on a smaller dataset"
            )
        oldest = manifests.pop(0)
        manifest = _read_json(oldest)
        base = root / str(manifest.get("local", ""))
        log.info("evicting the staged dataset %s (least recently used) to make room", manifest.get("dataset"))
        for relative in manifest.get("files", {}):
            (base / relative).unlink(missing_ok=True)
        oldest.unlink(missing_ok=True)
        _remove_empty_directories(base)


def _remove_empty_directories(top: Path) -> None:
    for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # refuses unless empty


def fetch_dataset(dataset: str, *, cache: Path | None = None, client: Any = None) -> Path:
    """A local directory holding ``dataset``: an S3 prefix is staged into the cache first (``cache``, else
    :func:`cache_root`), downloading only the objects not staged already at their current ETag.

    ``"synthetic"`` is passed on as it is (the task generates its data). A local path that does not exist,
    an S3 prefix with no objects, or a dataset the cache's volume cannot hold raises UserError.
    """
    if dataset == SYNTHETIC:
        return Path(SYNTHETIC)
    if not dataset.startswith("s3://"):
        path = Path(dataset)
        if not path.exists():
            raise UserError(f"dataset {dataset} does not exist; give a directory or an s3:// prefix")
        return path
    bucket, prefix = objects.split_s3_url(dataset)
    prefix = prefix.strip("/")
    s3 = client or objects.s3_client()
    root = cache or cache_root()
    local = _inside(root, root / bucket / prefix, dataset)
    source = f"s3://{bucket}/{prefix}"
    manifest_path = root / MANIFESTS / f"{hashlib.sha256(source.encode()).hexdigest()[:24]}.json"
    with _locked(manifest_path.with_suffix(".lock")):
        listing = _list_dataset(s3, bucket, prefix, dataset)
        staged: dict[str, Any] = dict(_read_json(manifest_path).get("files", {}))

        def stale() -> dict[str, dict[str, Any]]:
            return {
                relative: entry
                for relative, entry in listing.items()
                if not _is_fresh(local / relative, staged.get(relative), entry["size"], entry["etag"])
            }

        _evict_for(root, sum(entry["size"] for entry in stale().values()), keep=manifest_path)
        missing = stale()  # again: an evicted dataset may have shared files with this one (nested prefixes)
        for relative in set(staged) - set(listing):  # gone from S3: gone from the dataset
            (local / relative).unlink(missing_ok=True)
            del staged[relative]
        last_saved = time.monotonic()
        for relative, entry in missing.items():
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.part")
            s3.download_file(bucket, entry["key"], str(temporary))
            os.replace(temporary, target)
            staged[relative] = {"etag": entry["etag"], "size": entry["size"]}
            if time.monotonic() - last_saved > 10:  # an interrupted staging keeps what it downloaded
                _write_json(manifest_path, _manifest(source, local, root, staged))
                last_saved = time.monotonic()
        # Written even when nothing was downloaded: its time is the dataset's last use (eviction order).
        _write_json(manifest_path, _manifest(source, local, root, staged))
    if missing:
        log.info("staged %d of %d files of %s into %s", len(missing), len(listing), dataset, local)
    else:
        log.info("dataset %s is staged in %s already", dataset, local)
    return local


def _manifest(source: str, local: Path, root: Path, files: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": source, "local": str(local.relative_to(root)), "files": files}


def _inside(root: Path, path: Path, dataset: str) -> Path:
    """``path`` when it lies under ``root`` (the cache, whose files eviction deletes); UserError otherwise."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UserError(f"dataset {dataset} names a path outside the dataset cache; use a plain s3:// prefix")
    return path


def _list_dataset(s3: Any, bucket: str, prefix: str, dataset: str) -> dict[str, dict[str, Any]]:
    """The objects under the prefix: relative path -> key, size and ETag. UserError when there are none."""
    found: dict[str, dict[str, Any]] = {}
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
        )
        for page in pages:
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if key.endswith("/"):
                    continue
                relative = key[len(prefix) :].lstrip("/") if prefix else key
                if any(part in ("", ".", "..") for part in relative.split("/")):
                    # The cache is a directory tree: "a//b", "./" or "../" would alias or leave it.
                    log.warning("skipping object %s of dataset %s: its key is not a plain path", key, dataset)
                    continue
                found[relative] = {"key": key, "size": int(entry["Size"]), "etag": str(entry.get("ETag", ""))}
    except s3.exceptions.NoSuchBucket:
        raise UserError(f"the bucket of dataset {dataset} does not exist; fix the URL") from None
    if not found:
        raise UserError(f"dataset {dataset} holds no files; upload the dataset under that prefix")
    return found
