"""Images into a city's catalog, from a list of URLs, an ``s3://`` prefix or a local folder (the crawler's
job, without the scraping).

Every source becomes a list of :class:`Item`, each read only when its turn comes. A file is checked before
anything is kept (:func:`prepare`): not empty, not over :attr:`Limits.max_bytes`, a JPEG, PNG or WebP by its
first bytes (and by its name or the server's Content-Type, which must agree), decodable (``verify``, then a
full load), at most :attr:`Limits.max_pixels` pixels (decompression bombs are refused from the header). It is
stored turned the right way up (its EXIF orientation applied) and re-encoded without metadata: PNG for a
PNG, JPEG (quality 92) otherwise; the MD5 of those stored bytes names it, at
``catalog/<city slug>/images/<md5>.<ext>`` in the datasets bucket, once per city.

A file that fails a check is *rejected* with the reason, one already in the city is a *duplicate*, one past
a limit (:attr:`Limits.per_city`, :attr:`Limits.per_sight`: images the city or sight may hold) is
*skipped*; the run goes on and the :class:`IngestReport` lists every file with what became of it.

URLs are fetched over http or https only, from public addresses: a host that resolves to a loopback,
private, link-local (the cloud's metadata service), multicast or reserved address is refused, every
address it resolves to is checked, the connection goes to the checked address (no second lookup to rebind),
and each redirect is checked again. :attr:`Limits.allow_loopback` admits loopback, for tests and demos.
A local folder is read within itself: a link that leads out of it is refused, as is anything that is not a
plain file. Folders under a folder or prefix name the sight their images show (``paris/Eiffel Tower/1.jpg``).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import psycopg
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from PIL import Image, ImageOps, UnidentifiedImageError

from services.cloud import objects
from services.errors import UserError
from services.sight_catalog import warehouse

#: Largest file read (bytes).
MAX_BYTES = 20 * 2**20
#: Largest image decoded (pixels): about 40 megapixels.
MAX_PIXELS = 40_000_000
#: The quality JPEG and WebP files are stored at, as JPEG.
JPEG_QUALITY = 92
#: Names of image files, and the media type each claims.
IMAGE_SUFFIXES: Mapping[str, str] = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}
#: The environment variable naming the datasets bucket.
BUCKET_VARIABLE = "TESSERA_BUCKET_DATASETS"
_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
_NAMES = {"image/jpeg": "a JPEG", "image/png": "a PNG", "image/webp": "a WebP"}
_CHUNK = 1 << 16
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REDIRECTS = {301, 302, 303, 307, 308}


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


class RejectedError(Exception):
    """A file not taken; the message is the reason (the run goes on)."""


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


@dataclass(frozen=True)
class Prepared:
    """A checked image as it is stored: encoded bytes, their media type and MD5, and the oriented size."""

    data: bytes
    media_type: str
    md5: str
    width: int
    height: int


@dataclass(frozen=True)
class Outcome:
    """What became of one file: ``accepted``, ``duplicate`` (``image_id`` is the image already there),
    ``rejected`` or ``skipped`` (``reason`` says why)."""

    source: str
    status: str
    reason: str | None = None
    sight: str | None = None
    image_id: int | None = None
    md5: str | None = None
    s3_key: str | None = None


@dataclass
class IngestReport:
    """Every file of a run with its outcome, and notes (limits reached)."""

    city: str
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def having(self, status: str) -> list[Outcome]:
        """The outcomes with ``status``."""
        return [o for o in self.outcomes if o.status == status]

    @property
    def accepted(self) -> list[Outcome]:
        """The images stored by this run."""
        return self.having("accepted")

    @property
    def duplicates(self) -> list[Outcome]:
        """The files the city held already."""
        return self.having("duplicate")

    @property
    def rejected(self) -> list[Outcome]:
        """The files refused, with reasons."""
        return self.having("rejected")

    @property
    def skipped(self) -> list[Outcome]:
        """The files not read: a limit was reached."""
        return self.having("skipped")

    def summary(self) -> str:
        """One line: the counts of each outcome."""
        return (
            f"{self.city}: {len(self.accepted)} accepted, {len(self.duplicates)} duplicates, "
            f"{len(self.rejected)} rejected, {len(self.skipped)} skipped"
        )


Progress = Callable[[int, int, Outcome], None]


def datasets_bucket(env: Mapping[str, str] | None = None) -> str:
    """The datasets bucket (``TESSERA_BUCKET_DATASETS``); UserError when it is not set."""
    env = os.environ if env is None else env
    bucket = env.get(BUCKET_VARIABLE, "")
    if not bucket:
        raise UserError(f"no datasets bucket: set {BUCKET_VARIABLE} (the platform sets it for the service)")
    return bucket


# --- checking and storing an image --------------------------------------------------------------------------


def sniff(data: bytes) -> str | None:
    """The media type ``data`` starts like (JPEG, PNG or WebP), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _what(data: bytes) -> str:
    for magic, name in (
        (b"GIF8", "a GIF"),
        (b"BM", "a BMP"),
        (b"II*\x00", "a TIFF"),
        (b"MM\x00*", "a TIFF"),
        (b"%PDF", "a PDF"),
        (b"PK\x03\x04", "a ZIP archive"),
    ):
        if data.startswith(magic):
            return name
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith((b"<svg", b"<?xml")):
        return "XML or SVG"
    return "not an image"


def prepare(data: bytes, declared: str | None = None, *, max_pixels: int = MAX_PIXELS) -> Prepared:
    """Check ``data`` and encode it as stored (see the module); :class:`RejectedError` with the reason."""
    if not data:
        raise RejectedError("the file is empty")
    media_type = sniff(data)
    if media_type is None:
        raise RejectedError(f"not a JPEG, PNG or WebP image ({_what(data)}, {len(data)} bytes)")
    if declared is not None and declared != media_type:
        raise RejectedError(
            f"claims to be {_NAMES.get(declared, declared)} image but holds {_NAMES[media_type]}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_FORMATS[media_type]]) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise RejectedError(f"{width} x {height} pixels is over the limit of {max_pixels} pixels")
                probe.verify()
            with Image.open(io.BytesIO(data), formats=[_FORMATS[media_type]]) as image:
                image.load()
                icc = image.info.get("icc_profile")
                oriented = ImageOps.exif_transpose(image)
    except RejectedError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedError(f"too many pixels to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise RejectedError(
            f"cannot decode {_NAMES[media_type]} image: {exc or type(exc).__name__}"
        ) from None
    if oriented.width * oriented.height > max_pixels:  # the header said less than the pixels hold
        raise RejectedError(
            f"{oriented.width} x {oriented.height} pixels is over the limit of {max_pixels} pixels"
        )
    stored_type = "image/png" if media_type == "image/png" else "image/jpeg"
    out = io.BytesIO()
    extra: dict[str, Any] = {"icc_profile": icc} if isinstance(icc, bytes) else {}
    if stored_type == "image/png":
        if oriented.mode not in ("RGB", "RGBA", "L", "LA"):
            has_alpha = "A" in oriented.getbands() or "transparency" in oriented.info
            oriented = oriented.convert("RGBA" if has_alpha else "RGB")
        oriented.save(out, "PNG", **extra)
    else:
        if oriented.mode not in ("RGB", "L"):
            oriented = oriented.convert("RGB")
        oriented.save(out, "JPEG", quality=JPEG_QUALITY, **extra)
    stored = out.getvalue()
    return Prepared(stored, stored_type, hashlib.md5(stored).hexdigest(), oriented.width, oriented.height)


def ingest(
    conn: psycopg.Connection[Any],
    city: warehouse.City,
    items: Sequence[Item],
    *,
    bucket: str,
    s3_client: Any = None,
    sight: str | None = None,
    limits: Limits | None = None,
    create_sights: bool = True,
    progress: Progress | None = None,
) -> IngestReport:
    """Read, check and store ``items`` into ``city`` (see the module); every item gets an outcome.

    ``sight`` is the sight of items whose source names none. A sight named by the source is created when
    missing (``create_sights``), else the item is rejected. ``progress(done, total, outcome)`` is called
    after each item. UserError only for what stops every item: no AWS credentials.
    """
    limits = limits or Limits()
    client = s3_client or objects.s3_client()
    report = IngestReport(city.name)
    city_images = warehouse.count_images(conn, city.id)
    sights: dict[str, warehouse.Sight] = {}
    sight_images: dict[int, int] = {}
    for index, item in enumerate(items):
        outcome = _one(
            conn,
            city,
            item,
            item.sight or sight,
            limits,
            create_sights,
            sights,
            sight_images,
            city_images,
            bucket,
            client,
            report,
        )
        if outcome.status == "accepted":
            city_images += 1
        report.outcomes.append(outcome)
        if progress is not None:
            progress(index + 1, len(items), outcome)
    return report


def _one(  # noqa: PLR0917 - one item of ingest()'s loop
    conn: psycopg.Connection[Any],
    city: warehouse.City,
    item: Item,
    sight_name: str | None,
    limits: Limits,
    create_sights: bool,
    sights: dict[str, warehouse.Sight],
    sight_images: dict[int, int],
    city_images: int,
    bucket: str,
    client: Any,
    report: IngestReport,
) -> Outcome:
    if limits.per_city is not None and city_images >= limits.per_city:
        note = f"{city.name} holds {city_images} images, its limit ({limits.per_city}); the rest is skipped"
        if note not in report.notes:
            report.notes.append(note)
        return Outcome(item.source, "skipped", f"the city reached its limit of {limits.per_city} images")
    found: warehouse.Sight | None = None
    if sight_name is not None:
        try:
            name = warehouse.clean_name(sight_name, "sight")
        except UserError as exc:
            return Outcome(item.source, "rejected", f"bad sight name: {exc}", sight=sight_name)
        found = sights.get(name) or warehouse.find_sight(conn, city.id, name)
        if found is None and not create_sights:
            return Outcome(item.source, "rejected", f"{city.name} has no sight called {name!r}", sight=name)
        if found is None:
            found, _ = warehouse.add_sight(conn, city.id, name)
        sights[name] = found
        if found.id not in sight_images:
            sight_images[found.id] = warehouse.count_images(conn, city.id, sight_id=found.id)
        if limits.per_sight is not None and sight_images[found.id] >= limits.per_sight:
            held = sight_images[found.id]
            note = f"{name} holds {held} images, its limit ({limits.per_sight}); the rest is skipped"
            if note not in report.notes:
                report.notes.append(note)
            reason = f"the sight reached its limit of {limits.per_sight} images"
            return Outcome(item.source, "skipped", reason, sight=name)
    label = None if found is None else found.name
    try:
        if item.size is not None and item.size > limits.max_bytes:
            raise RejectedError(f"the file is {item.size} bytes, over the limit of {limits.max_bytes}")
        fetched = item.read(limits)
        prepared = prepare(fetched.data, fetched.declared, max_pixels=limits.max_pixels)
    except RejectedError as exc:
        return Outcome(item.source, "rejected", str(exc), sight=label)
    existing = warehouse.find_image(conn, city.id, prepared.md5)
    if existing is not None:
        return Outcome(item.source, "duplicate", None, label, existing.id, existing.md5, existing.s3_key)
    key = warehouse.image_key(city.slug, prepared.md5, prepared.media_type)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=prepared.data, ContentType=prepared.media_type)
    except NoCredentialsError:
        raise UserError(f"no AWS credentials to write to {bucket}: {objects.CREDENTIALS_HELP}") from None
    except (ClientError, BotoCoreError) as exc:
        return Outcome(item.source, "rejected", f"could not store it in {bucket}: {exc}", sight=label)
    image, new = warehouse.add_image(
        conn,
        city.id,
        md5=prepared.md5,
        s3_key=key,
        source=item.source[:2000],
        media_type=prepared.media_type,
        width=prepared.width,
        height=prepared.height,
        size_bytes=len(prepared.data),
        sight_id=None if found is None else found.id,
    )
    if not new:  # another worker stored it meanwhile
        return Outcome(item.source, "duplicate", None, label, image.id, image.md5, image.s3_key)
    if found is not None:
        sight_images[found.id] += 1
    return Outcome(item.source, "accepted", None, label, image.id, image.md5, image.s3_key)


# --- local folders ------------------------------------------------------------------------------------------


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


# --- S3 -----------------------------------------------------------------------------------------------------


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


# --- URLs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``, one the host resolved to, all of them allowed)."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str


def parse_url_list(text: str) -> list[tuple[str, str | None]]:
    """Lines of ``URL`` or ``URL<TAB>sight`` (blank lines and ``#`` comments skipped)."""
    entries: list[tuple[str, str | None]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        url, _, sight = line.partition("\t")
        entries.append((url.strip(), sight.strip() or None))
    return entries


def url_items(urls: Iterable[str | tuple[str, str | None]]) -> list[Item]:
    """Each URL (or ``(url, sight)``) as an item, in order; each is checked and fetched when read."""
    items: list[Item] = []
    for entry in urls:
        url, sight = (entry, None) if isinstance(entry, str) else entry
        items.append(Item(url, sight, None, _url_reader(url)))
    return items


def _url_reader(url: str) -> Callable[[Limits], Fetched]:
    def read(limits: Limits) -> Fetched:
        try:
            return fetch_url(url, limits)
        except UserError as exc:
            raise RejectedError(str(exc)) from None

    return read


def refusal(address: str, *, allow_loopback: bool = False) -> str | None:
    """Why a URL may not reach ``address`` (loopback, private, link-local...), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address (where cloud metadata services answer)"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"{ip} is not a public address"
    if ip.is_private:
        return f"{ip} is a private address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def check_url(url: str, *, allow_loopback: bool = False) -> Target:
    """``url`` checked for fetching (see the module): http or https, no credentials, a host whose every
    address is public. UserError saying why not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UserError(f"{url!r} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UserError(f"{url}: only http and https URLs are fetched, not {scheme or 'a bare path'}")
    host = parts.hostname
    if not host:
        raise UserError(f"{url}: names no host")
    if parts.username is not None or parts.password is not None:
        raise UserError(f"{url}: URLs with credentials are not fetched")
    port = port or (443 if scheme == "https" else 80)
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"{url}: cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in resolved))
    if not addresses:
        raise UserError(f"{url}: {host} resolves to no address")
    for address in addresses:
        reason = refusal(address, allow_loopback=allow_loopback)
        if reason is not None:
            named = "" if host == address else f" ({host} resolves to it)"
            raise UserError(f"{url}: refused, {reason}{named}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, scheme, host, port, path, addresses[0])


class _PinnedHTTP(http.client.HTTPConnection):
    """Plain HTTP to a checked address, whatever the host's name resolves to now."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        """Connect to the checked address."""
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate must still name the host."""

    def __init__(self, target: Target, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self._tls)
        self._address = target.address

    def connect(self) -> None:
        """Connect to the checked address and verify the host's certificate."""
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def fetch_url(url: str, limits: Limits | None = None) -> Fetched:
    """GET an image from ``url`` within ``limits`` (each hop checked, see :func:`check_url`);
    :class:`RejectedError` or UserError saying why not."""
    limits = limits or Limits()
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(limits.redirects + 1):
        target = check_url(url, allow_loopback=limits.allow_loopback)
        pinned = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        connection: http.client.HTTPConnection = pinned(target, limits.timeout_s)
        try:
            connection.request(
                "GET",
                target.path,
                headers={
                    "User-Agent": "tessera-sight-catalog/1",
                    "Accept": "image/jpeg, image/png, image/webp",
                    "Accept-Encoding": "identity",
                },
            )
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise RejectedError(f"HTTP {response.status} without a Location")
                url = urljoin(url, location)
                continue
            return _read_response(response, limits, deadline)
        except (OSError, http.client.HTTPException) as exc:
            raise RejectedError(f"could not fetch it: {exc or type(exc).__name__}") from None
        finally:
            connection.close()
    raise RejectedError(f"more than {limits.redirects} redirects")


def _read_response(response: http.client.HTTPResponse, limits: Limits, deadline: float) -> Fetched:
    if response.status != 200:
        raise RejectedError(f"HTTP {response.status} {response.reason}")
    content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type and content_type not in _FORMATS and content_type != "application/octet-stream":
        raise RejectedError(f"the server sent {content_type}, not a JPEG, PNG or WebP image")
    encoding = (response.getheader("Content-Encoding") or "identity").lower()
    if encoding != "identity":
        raise RejectedError(f"the server sent it {encoding}-encoded")
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > limits.max_bytes:
        raise RejectedError(f"the file is {length} bytes, over the limit of {limits.max_bytes}")
    body = bytearray()
    while block := response.read(_CHUNK):
        body += block
        if len(body) > limits.max_bytes:
            raise RejectedError(f"the file is over the limit of {limits.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise RejectedError(f"took longer than {limits.timeout_s:g} s")
    return Fetched(bytes(body), content_type if content_type in _FORMATS else None)
