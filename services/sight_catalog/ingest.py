"""Images into a city's catalog, from a list of URLs, an ``s3://`` prefix or a local folder (the crawler's
job, without the scraping).

Every source becomes a list of :class:`Item` (:mod:`services.sight_catalog.sources`, and
:mod:`services.sight_catalog.urls` for URLs, which are fetched from public addresses only), each read only
when its turn comes. A file is checked before anything is kept, and stored turned the right way up and
re-encoded without metadata (:func:`prepare`, :mod:`services.sight_catalog.image_checks`); the MD5 of those
stored bytes names it, at ``catalog/<city slug>/images/<md5>.<ext>`` in the datasets bucket, once per city.

A file that fails a check is *rejected* with the reason, one already in the city is a *duplicate*, one past
a limit (:attr:`Limits.per_city`, :attr:`Limits.per_sight`: images the city or sight may hold) is
*skipped*; the run goes on and the :class:`IngestReport` lists every file with what became of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from services.cloud import objects
from services.errors import UserError
from services.sight_catalog import warehouse
from services.sight_catalog.image_checks import (
    IMAGE_SUFFIXES,
    JPEG_QUALITY,
    MAX_BYTES,
    MAX_PIXELS,
    Prepared,
    RejectedError,
    prepare,
    sniff,
)
from services.sight_catalog.sources import Fetched, Item, Limits, folder_items, s3_items
from services.sight_catalog.urls import check_url, fetch_url, parse_url_list, refusal, url_items

__all__ = [
    "BUCKET_VARIABLE",
    "IMAGE_SUFFIXES",
    "JPEG_QUALITY",
    "MAX_BYTES",
    "MAX_PIXELS",
    "Fetched",
    "IngestReport",
    "Item",
    "Limits",
    "Outcome",
    "Prepared",
    "Progress",
    "RejectedError",
    "check_url",
    "datasets_bucket",
    "fetch_url",
    "folder_items",
    "ingest",
    "parse_url_list",
    "prepare",
    "refusal",
    "s3_items",
    "sniff",
    "url_items",
]

#: The environment variable naming the datasets bucket.
BUCKET_VARIABLE = "TESSERA_BUCKET_DATASETS"


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
