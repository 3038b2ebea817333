"""Where ingest reads images from: a local folder (:func:`folder_items`) or an ``s3://`` prefix
(:func:`s3_items`); URLs are :mod:`services.sight_catalog.urls`'. Every source becomes a list of
:class:`Item`, each read only when its turn comes, within the run's :class:`Limits`.

A local folder is read within itself: a link that leads out of it is refused, as is anything that is not a
plain file. Folders under a folder or prefix name the sight their images show (``paris/Eiffel Tower/1.jpg``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from services.cloud import objects
from services.errors import UserError
from services.sight_catalog.image_checks import IMAGE_SUFFIXES, MAX_BYTES, MAX_PIXELS, RejectedError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Limits:
    """What an ingest run accepts: file size, pixels, the time a URL may take, redirects followed, images a
    city or a sight may hold (None: no limit), and whether URLs may reach loopback (tests and demos)."""

    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    timeout_s: float = 20.0
    redirects: int = 3
    per_city: int | None = None
    per_sight: int | None = None
    allow_loopback: bool = False


@dataclass(frozen=True)
class Fetched:
    """A file's bytes and the media type its name or server claims (None: claims nothing)."""

    data: bytes
    declared: str | None


@dataclass(frozen=True)
class Item:
    """A file to ingest: ``source`` (URL, ``s3://`` URL or path, as recorded), the sight its source names (or
    None), its size when known, and ``read`` (raises :class:`RejectedError`)."""

    source: str
    sight: str | None
    size: int | None
    read: Callable[[Limits], Fetched]


def folder_items(folder: str | Path) -> list[Item]:
    """Every file under ``folder`` (recursively, by path; hidden folders are not entered), each as an item
    whose sight is the first folder under ``folder`` it is in (None at the top). UserError when ``folder`` is
    not a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder} is not a folder: name a folder of images (a folder per sight)")
    root = root.resolve()
    items: list[Item] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif (here / name).is_symlink():
                items.append(_refused(here / name, root, "a linked folder, not followed"))
        for name in sorted(filenames):
            path = here / name
            if name.startswith("."):
                items.append(_refused(path, root, "a hidden file"))
            else:
                items.append(_local_item(path, root))
    return items


def _sight_of(relative: Sequence[str]) -> str | None:
    return relative[0] if len(relative) > 1 else None


def _refused(path: Path, root: Path, reason: str) -> Item:
    def read(limits: Limits) -> Fetched:
        raise RejectedError(reason)

    return Item(str(path), _sight_of(path.relative_to(root).parts), None, read)


def _local_item(path: Path, root: Path) -> Item:
    sight = _sight_of(path.relative_to(root).parts)

    def read(limits: Limits) -> Fetched:
        declared = _declared_by_name(path.name)
        target = path
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # dangling, or a loop
                raise RejectedError(f"a broken link: {exc}") from None
            if not target.is_relative_to(root):
                raise RejectedError(f"a link to {target}, outside {root}")
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise RejectedError(f"cannot open it: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise RejectedError("not a plain file")
            if info.st_size > limits.max_bytes:
                raise RejectedError(f"the file is {info.st_size} bytes, over the limit of {limits.max_bytes}")
            data = file.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise RejectedError(f"the file is over the limit of {limits.max_bytes} bytes")
        return Fetched(data, declared)

    return Item(str(path), sight, None, read)


def _declared_by_name(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise RejectedError(
            f"not an image name ({suffix or 'no extension'}); images end {', '.join(IMAGE_SUFFIXES)}"
        )
    return IMAGE_SUFFIXES[suffix]


def s3_items(url: str, *, client: Any = None) -> list[Item]:
    """Every object under the ``s3://bucket/prefix`` folder (or the one object named), by key, each as an
    item whose sight is the first folder under the prefix it is in. UserError for a bad bucket name, a
    missing bucket, no access or no objects."""
    bucket, prefix = objects.split_s3_url(url)
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UserError(f"{url}: {bucket!r} is not a bucket name")
    client = client or objects.s3_client()
    listed: list[tuple[str, int]] = []
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            listed.extend((str(item["Key"]), int(item["Size"])) for item in page.get("Contents", []))
    except NoCredentialsError:
        raise UserError(f"no AWS credentials to list {url}: {objects.CREDENTIALS_HELP}") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise UserError(f"{url}: the bucket {bucket} does not exist") from None
        if code in {"AccessDenied", "403"}:
            raise UserError(f"{url}: not allowed to list it ({code}); check the credentials") from None
        raise
    exact = [(key, size) for key, size in listed if key == prefix]
    if prefix and exact:
        listed, folder = exact, prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    else:
        folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        listed = [(key, size) for key, size in listed if key.startswith(folder) and not key.endswith("/")]
    if not listed:
        raise UserError(f"{url} holds no objects")
    return [_s3_item(client, bucket, key, size, folder) for key, size in sorted(listed)]


def _s3_item(client: Any, bucket: str, key: str, size: int, folder: str) -> Item:
    source = f"s3://{bucket}/{key}"

    def read(limits: Limits) -> Fetched:
        declared = _declared_by_name(key.rsplit("/", 1)[-1])
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            data: bytes = body.read(limits.max_bytes + 1)
            body.close()
        except (ClientError, BotoCoreError) as exc:
            raise RejectedError(f"cannot read it: {exc}") from None
        if len(data) > limits.max_bytes:
            raise RejectedError(f"the file is over the limit of {limits.max_bytes} bytes")
        return Fetched(data, declared)

    return Item(source, _sight_of(key[len(folder) :].split("/")), size, read)
