"""The sky-position dataset: sky images plus a manifest of where and when each was taken.

Layout (what the sky generator writes)::

    DATASET/
      manifest.csv        or  manifest.jsonl
      <any/relative/path>.png | .jpg | .jpeg

``manifest.csv`` has a header row naming (at least) the columns ``file,lat,lon,time``; ``manifest.jsonl``
holds one JSON object per line with the same keys. ``file`` is the image path relative to DATASET; ``lat``
is the observer's geodetic latitude in degrees [-90, 90] (north positive); ``lon`` the longitude in degrees
[-180, 180] (east positive; 180 < lon <= 360 is accepted and wrapped); ``time`` the UTC instant of the
exposure in ISO-8601 (``2024-03-20T21:15:00Z`` or with an explicit offset, which is converted to UTC; a time
with no offset is taken as UTC). An optional ``split`` column names the shots to hold out for evaluation
(``held_out``) and to train on (``train``, or empty); when any row names a split, the task uses these instead
of a random ``val_fraction`` (a fixed test set shared by several runs, e.g. a learning curve). Other
columns/keys are ignored. If both files exist, ``manifest.jsonl`` wins. Blank lines in JSON lines are
skipped.

Time features (the model's ``time`` input) are :mod:`services.celnav.time_input`'s, re-exported here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.celnav.time_input import TIME_FEATURE_NAMES, TIME_FEATURES, time_features
from services.errors import UserError

__all__ = [
    "MANIFEST_NAMES",
    "SPLITS",
    "TIME_FEATURES",
    "TIME_FEATURE_NAMES",
    "SkyShot",
    "parse_time",
    "read_manifest",
    "time_features",
]

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")


@dataclass(frozen=True)
class SkyShot:
    """One manifest row: the image, the observer's latitude/longitude (degrees) and the UTC time."""

    file: Path
    lat: float
    lon: float
    time: datetime
    #: ``"held_out"``, ``"train"``, or None when the manifest names no split for this shot.
    split: str | None = None


#: The values of the manifest's optional ``split`` column.
SPLITS = ("train", "held_out")


def read_manifest(folder: Path) -> list[SkyShot]:
    """The shots listed in ``folder``'s manifest, images checked to exist; problems raise UserError."""
    folder = Path(folder)
    expected = "a folder of sky images with manifest.csv or manifest.jsonl (file, lat, lon, time)"
    if not folder.is_dir():
        raise UserError(f"dataset {folder} does not exist or is not a directory; expected {expected}")
    manifest = next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)
    if manifest is None:
        raise UserError(f"dataset {folder} has no manifest; expected {expected}")
    rows = _json_lines(manifest) if manifest.suffix == ".jsonl" else _csv_rows(manifest)
    shots = [_shot(folder, manifest, number, row) for number, row in rows]
    if not shots:
        raise UserError(f"manifest {manifest} lists no images; expected {expected}")
    return shots


def parse_time(text: str) -> datetime:
    """An ISO-8601 time as an aware UTC datetime (no offset: taken as UTC); bad text raises ValueError."""
    return _as_utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00")))


def _as_utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON: {error}") from error
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"file", "lat", "lon", "time"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(
                f"{path} header lacks column(s) {', '.join(sorted(missing))}; need file,lat,lon,time"
            )
        return [(number, row) for number, row in enumerate(reader, start=2)]


def _shot(folder: Path, manifest: Path, number: int, row: dict[str, Any]) -> SkyShot:
    where = f"{manifest} line {number}"
    try:
        file, lat, lon, when = (
            str(row["file"]),
            float(row["lat"]),
            float(row["lon"]),
            parse_time(str(row["time"])),
        )
    except KeyError as error:
        raise UserError(f"{where} lacks {error.args[0]!r}; need file, lat, lon, time") from error
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: {error} (lat/lon in degrees, time ISO-8601 UTC)") from error
    if not -90.0 <= lat <= 90.0:
        raise UserError(f"{where}: lat {lat} is outside [-90, 90]")
    if not -180.0 <= lon <= 360.0:
        raise UserError(f"{where}: lon {lon} is outside [-180, 360]")
    image = folder / file
    if not image.is_file():
        raise UserError(f"{where}: image {file} does not exist under {folder}")
    split = str(row.get("split") or "").strip() or None
    if split is not None and split not in SPLITS:
        raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)} (or empty)")
    return SkyShot(image, lat, lon - 360.0 if lon > 180.0 else lon, when, split)
