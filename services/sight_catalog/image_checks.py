"""What a file must be to enter the catalog, and how it is stored (:func:`prepare`).

A file is checked before anything is kept: not empty, not over the size limit
(:attr:`~services.sight_catalog.sources.Limits.max_bytes`), a JPEG, PNG or WebP by its first bytes (and by
its name or the server's Content-Type, which must agree), decodable (``verify``, then a full load), at most
``max_pixels`` pixels (decompression bombs are refused from the header). It is stored turned the right way
up (its EXIF orientation applied) and re-encoded without metadata: PNG for a PNG, JPEG (quality 92)
otherwise; the MD5 of those stored bytes names it (:mod:`services.sight_catalog.ingest` stores it).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

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
#: The Pillow format of each media type read.
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
_NAMES = {"image/jpeg": "a JPEG", "image/png": "a PNG", "image/webp": "a WebP"}


class RejectedError(Exception):
    """A file not taken; the message is the reason (the run goes on)."""


@dataclass(frozen=True)
class Prepared:
    """A checked image as it is stored: encoded bytes, their media type and MD5, and the oriented size."""

    data: bytes
    media_type: str
    md5: str
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """The media type ``data`` starts like (JPEG, PNG or WebP), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def what_it_is(data: bytes) -> str:
    """What ``data`` looks like when it is no image this reads: ``a GIF``, ``an HTML page``..."""
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
        raise RejectedError(f"not a JPEG, PNG or WebP image ({what_it_is(data)}, {len(data)} bytes)")
    if declared is not None and declared != media_type:
        raise RejectedError(
            f"claims to be {_NAMES.get(declared, declared)} image but holds {_NAMES[media_type]}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[FORMATS[media_type]]) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise RejectedError(f"{width} x {height} pixels is over the limit of {max_pixels} pixels")
                probe.verify()
            with Image.open(io.BytesIO(data), formats=[FORMATS[media_type]]) as image:
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
