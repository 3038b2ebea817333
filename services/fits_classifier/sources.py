"""What ``tessera fits classify`` is pointed at, as a list of frames to read: files, folders, S3 prefixes.

A file is taken whatever its name (the user named it); a folder is searched recursively for FITS names
(:data:`FITS_SUFFIXES`, case-insensitive; hidden files and folders skipped); an ``s3://bucket/prefix`` is
listed the same way. Each frame is read only when its turn comes, so a night of frames is never all in
memory. Frames over :data:`services.frames.reading.MAX_FITS_BYTES` are still listed; they are streamed
for their checksum, never loaded, and their verdict says why (:func:`oversized_reason`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cloud import objects
from services.errors import UserError
from services.frames.reading import MAX_FITS_BYTES

_CHUNK = 1 << 20
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fz")


@dataclass(frozen=True)
class FrameSource:
    """One frame to classify: where it is (``name``: a path or ``s3://`` URL), its size, how to read it
    (``load``: the whole file) and how to stream it (``chunks``: for a file too large to load)."""

    name: str
    size: int
    load: Callable[[], bytes]
    chunks: Callable[[], Iterator[bytes]]


def is_fits_name(name: str) -> bool:
    """Whether a file name looks like a FITS frame (see :data:`FITS_SUFFIXES`)."""
    return name.lower().endswith(FITS_SUFFIXES)


def list_sources(targets: Sequence[str], *, s3_client: Any = None) -> list[FrameSource]:
    """Every frame under ``targets`` (files, folders, ``s3://`` prefixes), each once, in a stable order.

    A target that does not exist, or a folder or prefix with no FITS file, is a UserError naming it.
    """
    found: dict[str, FrameSource] = {}
    for target in targets:
        listed = _s3_sources(target, s3_client) if target.startswith("s3://") else _local_sources(target)
        for source in listed:
            found.setdefault(source.name, source)
    return list(found.values())


def _local_sources(target: str) -> list[FrameSource]:
    path = Path(target)
    if path.is_file():
        return [local_source(path)]
    if not path.exists():
        raise UserError(f"{target} does not exist: name FITS files, folders of them, or s3:// prefixes")
    if not path.is_dir():
        raise UserError(f"{target} is neither a file nor a folder")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and is_fits_name(p.name)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"{target} holds no FITS files (names ending {', '.join(FITS_SUFFIXES)})")
    return [local_source(p) for p in files]


def local_source(path: Path) -> FrameSource:
    """The file at ``path`` as a frame source."""

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as file:
            while block := file.read(_CHUNK):
                yield block

    return FrameSource(str(path), path.stat().st_size, path.read_bytes, chunks)


def _s3_sources(target: str, client: Any) -> list[FrameSource]:
    bucket, prefix = objects.split_s3_url(target)
    client = client or objects.s3_client()
    keys: list[tuple[str, int]] = []
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend((item["Key"], int(item["Size"])) for item in page.get("Contents", []))
    except client.exceptions.NoSuchBucket:
        raise UserError(f"{target}: bucket {bucket} does not exist") from None
    if prefix and not prefix.endswith("/") and any(key == prefix for key, _ in keys):
        keys = [(key, size) for key, size in keys if key == prefix]  # one object named exactly
    else:
        keys = [(key, size) for key, size in keys if is_fits_name(key.rsplit("/", 1)[-1])]
    if not keys:
        raise UserError(f"{target} holds no FITS objects (names ending {', '.join(FITS_SUFFIXES)})")
    return [s3_source(client, bucket, key, size) for key, size in sorted(keys)]


def s3_source(client: Any, bucket: str, key: str, size: int) -> FrameSource:
    """The object ``s3://bucket/key`` of ``size`` bytes as a frame source."""

    def load() -> bytes:
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def chunks() -> Iterator[bytes]:
        yield from client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(_CHUNK)

    return FrameSource(f"s3://{bucket}/{key}", size, load, chunks)


def oversized_reason(source: FrameSource) -> str | None:
    """Why ``source`` is not read at all (too large), or None."""
    if source.size > MAX_FITS_BYTES:
        return f"the file is {source.size} bytes; frames over {MAX_FITS_BYTES} bytes are refused"
    return None


def streamed_checksum(source: FrameSource) -> str:
    """SHA-256 of ``source``'s bytes, read a block at a time (for a file too large to hold)."""
    digest = hashlib.sha256()
    for block in source.chunks():
        digest.update(block)
    return digest.hexdigest()


def batched(items: Iterable[FrameSource], size: int) -> Iterable[list[FrameSource]]:
    """``items`` in lists of ``size``."""
    batch: list[FrameSource] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
