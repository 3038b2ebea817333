"""Telescope frames read from FITS: a 2-D float32 image with its header, or a UserError saying what is wrong.

What is read, and how:

- ``source`` is a path or the file's bytes. Gzip-compressed files (``.fits.gz``) are decompressed here, up to
  :data:`MAX_FITS_BYTES`; tile-compressed images (``.fz``, a ``CompImageHDU``) are decompressed by astropy.
  Bytes that are not FITS but a common picture or archive are named for what they are (a PNG saved under a
  ``.fits`` name is refused as a PNG image).
- The HDU: the one asked for by name (``hdu="SCI"``, EXTNAME, case-insensitive) or index (``hdu=1``), else
  the first image HDU whose header declares data.
- Values: astropy applies BSCALE/BZERO (and BLANK -> NaN) to the stored integers, so signed data stays
  signed and unsigned 16-bit data stored as int16 with BZERO = 32768 comes out as 0..65535; the result is
  cast to float32 only then. (The original classifier cast frames to uint16, which wraps every negative
  value: -5 became 65531.) int32/int64 values beyond 2**24 lose their last bits in float32, far below the
  noise of any frame. NaNs are kept; :func:`services.frames.preprocess.prepare` replaces them.
- Shape: size-1 axes are dropped; what remains must be 2-D with at least 2 pixels on each side.

Every problem is checked before astropy touches the data, so a lying header (NAXIS claiming more bytes than
the file holds) costs no allocation and says so, rather than surfacing as a numpy reshape error.
"""

from __future__ import annotations

import gzip
import importlib
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from services.errors import UserError

#: The largest FITS file (after gzip decompression) read into memory: a 2048 x 2056 float64 frame is 34 MB.
MAX_FITS_BYTES = 1 << 30
#: The most pixels a tile-compressed image may declare (its float32 frame then takes MAX_FITS_BYTES).
MAX_IMAGE_PIXELS = MAX_FITS_BYTES // 4
_BLOCK = 2880
_CARD = 80
_GZIP_MAGIC = b"\x1f\x8b"
_SIMPLE = b"SIMPLE  ="
_END = b"END" + b" " * 77

Source = str | os.PathLike[str] | bytes
#: What other files start with, so that a ``.fits`` name on a picture or an archive is named for what it is.
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"\x28\xb5\x2f\xfd", "a zstandard archive"),
    (b"<!DOCTYPE html", "an HTML page"),
    (b"<html", "an HTML page"),
)


def _decompression_errors() -> tuple[type[Exception], ...]:
    """The exception astropy's tile decompressor raises on corrupt data (a private class, so looked up)."""
    try:
        module = importlib.import_module("astropy.io.fits.hdu.compressed._compression")
    except ImportError:
        return ()
    error = getattr(module, "CfitsioException", None)
    return (error,) if isinstance(error, type) and issubclass(error, Exception) else ()


#: What astropy raises on bytes it cannot make sense of: each means the file is broken, not the code.
_READ_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
    zlib.error,
    fits.VerifyError,
    *_decompression_errors(),
)


@dataclass(frozen=True)
class Frame:
    """One telescope frame: ``data`` (float32, 2-D, NaN where the file had no value), the HDU's ``header``,
    and which HDU it came from (``hdu_index`` in the file, ``hdu_name`` its EXTNAME or PRIMARY)."""

    data: np.ndarray
    header: fits.Header
    hdu_index: int
    hdu_name: str


def read_frame(source: Source, *, hdu: int | str | None = None) -> Frame:
    """The 2-D image in ``source`` (a path or the file's bytes); see the module docstring.

    ``hdu``: the HDU's index or EXTNAME; by default the first image HDU that holds data. Any input that is
    not a readable 2-D frame raises :class:`~services.errors.UserError` naming the input and the problem.
    """
    what, raw = _raw_bytes(source)
    _check_structure(what, raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's verify chatter; problems that matter are raised below
            with fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False) as hdus:
                index = _choose_hdu(what, hdus, hdu)
                chosen = hdus[index]
                header = chosen.header.copy()
                name = chosen.name or ("PRIMARY" if index == 0 else "")
                data = chosen.data
                if data is None:
                    raise UserError(f"{what}: HDU {_label(index, name)} holds no image data")
                image = np.asarray(data)
    except UserError:
        raise
    except _READ_ERRORS as error:
        raise UserError(
            f"{what}: cannot read the FITS image, the file is corrupt: {error}; copy it again from where it "
            "was written"
        ) from error
    return Frame(_as_frame(what, image, index, name), header, index, name)


def _raw_bytes(source: Source) -> tuple[str, bytes]:
    """A name for messages and the (gunzipped) bytes of ``source``."""
    if isinstance(source, bytes | bytearray | memoryview):
        what, raw = f"FITS data ({len(source)} bytes)", bytes(source)
    else:
        path = Path(source)
        what = f"FITS file {path}"
        try:
            size = path.stat().st_size
            if size > MAX_FITS_BYTES:
                raise UserError(f"{what} is {size} bytes; frames over {MAX_FITS_BYTES} bytes are refused")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{what} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"{what} is a directory, not a FITS file") from None
        except OSError as error:
            raise UserError(f"{what} cannot be read: {error}") from error
    if not raw:
        raise UserError(f"{what} is empty (0 bytes); expected a FITS file")
    if raw.startswith(_GZIP_MAGIC):
        raw = _gunzip(what, raw)
    return what, raw


def _gunzip(what: str, raw: bytes) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            data = stream.read(MAX_FITS_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(
            f"{what}: truncated or corrupt gzip stream ({error}); the file was cut short or damaged on its "
            "way: copy it again (gzip -t tests a copy)"
        ) from error
    if len(data) > MAX_FITS_BYTES:
        raise UserError(f"{what}: decompresses to over {MAX_FITS_BYTES} bytes; refused")
    if not data:
        raise UserError(f"{what}: the gzip stream is empty (0 bytes); expected a FITS file")
    return data


def _check_structure(what: str, raw: bytes) -> None:
    """Walk the HDUs' headers: the file must be FITS, every header must end, every data unit must fit."""
    if not raw.startswith(_SIMPLE):
        kind = next((name for magic, name in _OTHER_FORMATS if raw.startswith(magic)), None)
        if kind is not None:
            raise UserError(
                f"{what} is not a FITS file: it is {kind} (whatever its name says); send the FITS frame "
                "the camera wrote, or convert the image to FITS first"
            )
        start = raw[:20].decode("ascii", "replace")
        raise UserError(f"{what} is not a FITS file: it starts with {start!r}, a FITS file with 'SIMPLE  ='")
    offset, index = 0, 0
    while offset < len(raw):
        if not raw[offset : offset + _BLOCK].strip(b"\0 "):
            return  # trailing padding after the last HDU
        if index > 0 and not raw.startswith(b"XTENSION=", offset):
            return  # trailing bytes after the last HDU (astropy ignores them too)
        header_end = _header_end(raw, offset)
        if header_end is None:
            raise UserError(
                f"{what} is truncated: the header of HDU {index} (at byte {offset}) has no END card "
                f"before the file ends at byte {len(raw)}"
            )
        cards = _cards(raw[offset:header_end])
        need = _data_bytes(what, index, cards)
        held = len(raw) - header_end
        if need > held:
            naxis = int(cards.get("NAXIS", 0))
            axes = (
                " x ".join(str(cards.get(f"NAXIS{i}", "?")) for i in range(1, naxis + 1))
                if naxis <= 8
                else f"of {naxis} axes"
            )
            raise UserError(
                f"{what} is truncated: HDU {index}'s header (BITPIX {cards.get('BITPIX')}, NAXIS {axes}) "
                f"claims {need} bytes of data but the file holds only {max(held, 0)} after the header; copy "
                "the whole file again, or fix the header if its NAXISn are wrong"
            )
        if cards.get("ZIMAGE"):
            _check_compressed_size(what, index, cards)
        offset = header_end + math.ceil(need / _BLOCK) * _BLOCK
        index += 1


def _header_end(raw: bytes, offset: int) -> int | None:
    """The byte after the header block holding the END card that starts at ``offset``, or None."""
    position = offset
    while position + _BLOCK <= len(raw):
        block = raw[position : position + _BLOCK]
        for card in range(0, _BLOCK, _CARD):
            if block[card : card + _CARD].rstrip() == b"END":
                return position + _BLOCK
        position += _BLOCK
    # A last, short block may still hold END (a file cut inside the padding): accept, data checked next.
    tail = raw[position:]
    for card in range(0, len(tail) - len(tail) % _CARD, _CARD):
        if tail[card : card + _CARD].rstrip() == b"END":
            return len(raw)
    return None


def _cards(header: bytes) -> dict[str, Any]:
    """The structural keywords of one raw header (BITPIX, NAXISn, PCOUNT, GCOUNT, GROUPS; ZIMAGE and
    ZNAXISn of a tile-compressed image) as numbers and booleans."""
    found: dict[str, Any] = {}
    for start in range(0, len(header), _CARD):
        card = header[start : start + _CARD].decode("ascii", "replace")
        key = card[:8].strip()
        if key == "END":
            break
        if card[8:10] != "= " or not (
            key in {"BITPIX", "PCOUNT", "GCOUNT", "GROUPS", "ZIMAGE"} or key.startswith(("NAXIS", "ZNAXIS"))
        ):
            continue
        value = card[10:].split("/", 1)[0].strip()
        if key in {"GROUPS", "ZIMAGE"}:
            found[key] = value == "T"
            continue
        try:
            found[key] = int(value)
        except ValueError:
            found[key] = value  # reported by _data_bytes
    return found


def _data_bytes(what: str, index: int, cards: dict[str, Any]) -> int:
    """Bytes of data the header declares (FITS 4.4.1: |BITPIX|/8 x GCOUNT x (PCOUNT + product of NAXISn))."""
    bitpix, naxis = cards.get("BITPIX"), cards.get("NAXIS")
    if bitpix not in {8, 16, 32, 64, -32, -64} or not isinstance(naxis, int) or not 0 <= naxis <= 999:
        raise UserError(
            f"{what}: HDU {index} has a broken header (BITPIX {bitpix!r}, NAXIS {naxis!r}); "
            "it is not a FITS image this reader understands"
        )
    if naxis == 0:
        return 0
    declared = [cards.get(f"NAXIS{i}") for i in range(1, naxis + 1)]
    axes = [a for a in declared if isinstance(a, int) and a >= 0]
    if len(axes) != naxis:
        wrong = [
            f"NAXIS{i} = {a!r}" for i, a in enumerate(declared, 1) if not (isinstance(a, int) and a >= 0)
        ]
        shown = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise UserError(
            f"{what}: HDU {index} declares NAXIS = {naxis} but {shown}; "
            "each NAXISn must be a whole number >= 0"
        )
    if cards.get("GROUPS") and axes[0] == 0:
        axes = axes[1:]  # random groups: NAXIS1 = 0 is not a dimension
    pcount, gcount = cards.get("PCOUNT", 0), cards.get("GCOUNT", 1)
    if not isinstance(pcount, int) or not isinstance(gcount, int):
        raise UserError(f"{what}: HDU {index} has PCOUNT {pcount!r}, GCOUNT {gcount!r}; expected integers")
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))


def _check_compressed_size(what: str, index: int, cards: dict[str, Any]) -> None:
    """A tile-compressed image's declared size (ZNAXISn) must be sane: decompressing allocates all of it."""
    znaxis = cards.get("ZNAXIS")
    broken = f"{what}: HDU {index} is a compressed image with a broken ZNAXIS/ZNAXISn header"
    if not isinstance(znaxis, int) or not 0 <= znaxis <= 999:
        raise UserError(broken)
    declared = [cards.get(f"ZNAXIS{i}") for i in range(1, znaxis + 1)]
    axes = [a for a in declared if isinstance(a, int) and a >= 0]
    if len(axes) != znaxis:
        raise UserError(broken)
    pixels = math.prod(axes)
    if pixels > MAX_IMAGE_PIXELS:
        shape = " x ".join(str(a) for a in axes)
        raise UserError(
            f"{what}: HDU {index} is a compressed image declaring {shape} pixels ({pixels}); "
            f"images over {MAX_IMAGE_PIXELS} pixels are refused"
        )


def _label(index: int, name: str) -> str:
    return f"{index} ({name})" if name else str(index)


def _holds_image(hdu: Any) -> bool:
    header = hdu.header
    naxis = int(header.get("NAXIS", 0))
    return (
        bool(hdu.is_image)
        and naxis > 0
        and all(int(header.get(f"NAXIS{i}", 0)) > 0 for i in range(1, naxis + 1))
    )


def _choose_hdu(what: str, hdus: fits.HDUList, wanted: int | str | None) -> int:
    listing = ", ".join(f"{i} {h.name or '(unnamed)'} {type(h).__name__}" for i, h in enumerate(hdus))
    if wanted is None:
        for index, hdu in enumerate(hdus):
            if _holds_image(hdu):
                return index
        raise UserError(
            f"{what} holds no image data: no HDU is an image with pixels (HDUs: {listing}); a frame is a 2-D "
            "image in the primary HDU or an image extension, not a header alone or a table"
        )
    if isinstance(wanted, bool) or not isinstance(wanted, int | str):
        raise UserError(f"hdu must be an index or an EXTNAME, got {wanted!r}")
    if isinstance(wanted, int):
        if not 0 <= wanted < len(hdus):
            raise UserError(
                f"{what} has no HDU {wanted}: it has {len(hdus)} (HDUs: {listing}); ask for one of these"
            )
        index = wanted
    else:
        matches = [i for i, h in enumerate(hdus) if h.name.upper() == wanted.upper()]
        if not matches:
            raise UserError(
                f"{what} has no HDU named {wanted!r} (HDUs: {listing}); ask for one of these by EXTNAME "
                "or index"
            )
        index = matches[0]
    hdu = hdus[index]
    if not hdu.is_image:
        raise UserError(f"{what}: HDU {_label(index, hdu.name)} is a {type(hdu).__name__}, not an image")
    if not _holds_image(hdu):
        raise UserError(
            f"{what}: HDU {_label(index, hdu.name)} holds no image data "
            f"(NAXIS = {hdu.header.get('NAXIS', 0)})"
        )
    return index


def _as_frame(what: str, image: np.ndarray, index: int, name: str) -> np.ndarray:
    """``image`` with size-1 axes dropped, as float32 2-D; refuses cubes, lines and single pixels."""
    where = f"{what}, HDU {_label(index, name)}"
    shape = " x ".join(str(n) for n in image.shape)
    data = np.squeeze(image)
    if data.ndim == 0:
        raise UserError(f"{where}: the image is a single pixel ({shape}); expected a 2-D frame")
    if data.ndim == 1:
        raise UserError(f"{where}: the image is 1-D ({shape} pixels); expected a 2-D frame")
    if data.ndim == 3:
        planes, height, width = data.shape
        raise UserError(
            f"{where}: the image is a 3-D cube of {planes} planes of {height} x {width} pixels ({shape}); "
            "expected one 2-D frame: split the cube and give one plane per file"
        )
    if data.ndim > 3:
        raise UserError(f"{where}: the image is {data.ndim}-D ({shape}); expected a 2-D frame")
    with np.errstate(over="ignore", invalid="ignore"):
        frame = np.asarray(data, dtype=np.float32)
    if data.dtype.kind == "f" and data.dtype.itemsize > frame.dtype.itemsize:
        overflowed = int(np.count_nonzero(np.isinf(frame) & np.isfinite(data)))
        if overflowed:
            raise UserError(
                f"{where}: {overflowed} pixel values lie beyond +-3.4e38 (float32's range), which no "
                "detector records; the data or its scaling (BSCALE/BZERO) is broken: check how the file "
                "was written"
            )
    return frame
