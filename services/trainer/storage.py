"""Where a job's files live (an S3 prefix or a local directory) and where its dataset is read from.

:class:`Storage` is the job's output: checkpoints, the model, curves, logs. Every write is atomic (a local
write to a temporary name then ``os.replace``; on S3 one PUT), so a reader never sees half a file.
:func:`fetch_dataset` copies an S3 dataset prefix into a local cache once (files already there with the
same size are kept) and hands the task a directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from services.cloud import objects
from services.errors import UserError

#: The dataset word that means "generate the data" (tasks that can, e.g. the detector).
SYNTHETIC = "synthetic"
CACHE_ENV = "TESSERA_TRAINER_CACHE"


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


def storage_for(output: str, client: Any = None) -> Storage:
    """The storage an output location names: ``s3://bucket/prefix`` or a local directory."""
    if output.startswith("s3://"):
        return S3Storage(output, client)
    return LocalStorage(output)


def cache_root() -> Path:
    """Where S3 datasets are cached (``$TESSERA_TRAINER_CACHE``, else a temporary directory)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    import tempfile

    return Path(tempfile.gettempdir()) / "tessera-datasets"


def fetch_dataset(dataset: str, *, cache: Path | None = None, client: Any = None) -> Path:
    """A local directory holding ``dataset``: an S3 prefix is copied into the cache first.

    ``"synthetic"`` is passed on as it is (the task generates its data). A local path that does not exist,
    or an S3 prefix with no objects, raises UserError.
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
    local = (cache or cache_root()) / bucket / prefix
    found = 0
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
        )
        for page in pages:
            for entry in page.get("Contents", []):
                key, size = entry["Key"], int(entry["Size"])
                if key.endswith("/"):
                    continue
                relative = key[len(prefix) :].lstrip("/") if prefix else key
                target = local / relative
                found += 1
                if target.is_file() and target.stat().st_size == size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.with_name(f".{target.name}.part")
                s3.download_file(bucket, key, str(temporary))
                os.replace(temporary, target)
    except s3.exceptions.NoSuchBucket:
        raise UserError(f"the bucket of dataset {dataset} does not exist; fix the URL") from None
    if not found:
        raise UserError(f"dataset {dataset} holds no files; upload the dataset under that prefix")
    return local
