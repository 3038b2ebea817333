"""A copy of a judged frame with its verdict in header keywords; the original is never modified.

The keywords go into the header of the HDU that was classified (and the primary header, so a viewer that
shows only that one sees them too):

``TSVERDCT`` the verdict (a class name), ``TSSCORE`` its probability, ``TSMODEL`` / ``TSMODVER`` the model's
name and version, ``TSCLSTIM`` when (UTC, ISO 8601), ``TSSHA256`` the SHA-256 of the original file, and a
``HISTORY`` line. The copy keeps the original's form: a gzip file stays gzipped, a tile-compressed HDU stays
compressed (astropy recompresses it losslessly for integer data).
"""

from __future__ import annotations

import gzip
import io
import warnings
from typing import Any

from astropy.io import fits

from services.fits_classifier.verdicts import CLASSIFIED, Verdict

KEYWORDS = ("TSVERDCT", "TSSCORE", "TSMODEL", "TSMODVER", "TSCLSTIM", "TSSHA256")
_GZIP_MAGIC = b"\x1f\x8b"


def annotated_copy(raw: bytes, verdict: Verdict) -> bytes:
    """The bytes of ``raw`` (a FITS file, possibly gzipped) with ``verdict`` in its headers.

    Only for a classified frame: an unreadable one has no header to annotate (ValueError).
    """
    if verdict.status != CLASSIFIED:
        raise ValueError("only a classified frame can be annotated")
    zipped = raw.startswith(_GZIP_MAGIC)
    data = gzip.decompress(raw) if zipped else raw
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(io.BytesIO(data), memmap=False) as hdus:
            chosen = _chosen(hdus, verdict.hdu)
            targets = [hdus[0].header] if chosen == 0 else [hdus[0].header, hdus[chosen].header]
            for header in targets:
                _stamp(header, verdict)
            hdus.writeto(out, output_verify="silentfix")
    written = out.getvalue()
    return gzip.compress(written, mtime=0) if zipped else written


def _chosen(hdus: fits.HDUList, name: str | None) -> int:
    """The index of the HDU the verdict names (EXTNAME, PRIMARY or an index), else the primary."""
    if name is None:
        return 0
    if name.isdigit():
        return min(int(name), len(hdus) - 1)
    for index, hdu in enumerate(hdus):
        if (hdu.name or "").upper() == name.upper():
            return index
    return 0


def _stamp(header: Any, verdict: Verdict) -> None:
    header["TSVERDCT"] = (verdict.verdict, "tessera frame classifier verdict")
    header["TSSCORE"] = (round(float(verdict.score or 0.0), 6), "probability of the verdict")
    header["TSMODEL"] = (verdict.model_name[:68], "classifier model name")
    header["TSMODVER"] = (verdict.model_version[:68], "classifier model version")
    header["TSCLSTIM"] = (verdict.classified_at.strftime("%Y-%m-%dT%H:%M:%S"), "UTC time of the verdict")
    header["TSSHA256"] = (verdict.checksum, "SHA-256 of the original file")
    header.add_history(
        f"tessera: classified {verdict.verdict} ({verdict.score or 0.0:.3f}) by {verdict.model_name}"
    )
