"""services.frames.read_frame on real FITS files written here: every BITPIX, scaling, NaNs, gzip and
tile compression, HDU choice, and every kind of broken input answered by a UserError that says what is wrong.

Where the reader's values could simply echo astropy's, the expected values are decoded from the file's bytes
independently (big-endian integers after the header, times BSCALE plus BZERO)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.errors import UserError
from services.frames import read_frame
from services.frames.reading import MAX_IMAGE_PIXELS

BLOCK = 2880


def write(path: Path, *hdus: fits.hdu.base.ExtensionHDU) -> Path:
    """``hdus`` written to ``path`` (a PrimaryHDU first, added empty when the first is an extension)."""
    listing = list(hdus)
    if not isinstance(listing[0], fits.PrimaryHDU):
        listing.insert(0, fits.PrimaryHDU())
    fits.HDUList(listing).writeto(path)
    return path


def stored_primary(path: Path) -> tuple[dict[str, str], np.ndarray]:
    """The primary header's cards (raw strings) and its data as stored: big-endian, unscaled."""
    raw = path.read_bytes()
    cards: dict[str, str] = {}
    offset = 0
    while True:
        card = raw[offset : offset + 80].decode("ascii")
        offset += 80
        if card.rstrip() == "END":
            break
        if card[8:10] == "= ":
            cards[card[:8].strip()] = card[10:].split("/")[0].strip()
    start = -(-offset // BLOCK) * BLOCK
    dtype = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}[int(cards["BITPIX"])]
    shape = tuple(int(cards[f"NAXIS{i}"]) for i in range(int(cards["NAXIS"]), 0, -1))
    count = int(np.prod(shape))
    data = np.frombuffer(raw, dtype, count, start).reshape(shape)
    return cards, data


def physical(cards: dict[str, str], stored: np.ndarray) -> np.ndarray:
    """The FITS rule: physical = BSCALE * stored + BZERO (float64)."""
    return float(cards.get("BSCALE", "1")) * stored.astype(np.float64) + float(cards.get("BZERO", "0"))


RNG = np.random.default_rng(7)


@pytest.mark.parametrize(
    ("dtype", "bitpix", "values"),
    [
        (np.uint8, 8, RNG.integers(0, 256, (5, 7))),
        (np.int16, 16, RNG.integers(-32768, 32768, (5, 7))),
        (np.int32, 32, RNG.integers(-(2**31), 2**31, (5, 7))),
        (np.float32, -32, RNG.normal(0, 1e3, (5, 7))),
        (np.float64, -64, RNG.normal(0, 1e3, (5, 7))),
    ],
)
def test_every_bitpix(tmp_path: Path, dtype: type, bitpix: int, values: np.ndarray) -> None:
    path = write(tmp_path / "f.fits", fits.PrimaryHDU(values.astype(dtype)))
    cards, stored = stored_primary(path)
    assert int(cards["BITPIX"]) == bitpix and "BZERO" not in cards
    frame = read_frame(path)
    assert frame.data.dtype == np.float32 and frame.data.shape == (5, 7)
    assert frame.hdu_index == 0 and frame.hdu_name == "PRIMARY"
    np.testing.assert_array_equal(frame.data, physical(cards, stored).astype(np.float32))


def test_unsigned_16_bit_with_bzero(tmp_path: Path) -> None:
    adu = np.array([[0, 1, 32767], [32768, 50000, 65535]], np.uint16)
    path = write(tmp_path / "u16.fits", fits.PrimaryHDU(adu))
    cards, stored = stored_primary(path)
    assert cards["BITPIX"] == "16" and float(cards["BZERO"]) == 32768 and stored.dtype == ">i2"
    assert stored.min() < 0  # stored signed: half of these values are negative int16 in the file
    frame = read_frame(path)
    np.testing.assert_array_equal(frame.data, physical(cards, stored))
    np.testing.assert_array_equal(frame.data, adu.astype(np.float32))


def test_negative_signed_16_bit_values_do_not_wrap(tmp_path: Path) -> None:
    # Bias-subtracted frames go below zero; a uint16 cast would turn -5 into 65531.
    values = np.array([[-32768, -1000, -5], [0, 5, 32767]], np.int16)
    path = write(tmp_path / "s16.fits", fits.PrimaryHDU(values))
    data = read_frame(path).data
    assert data[0, 2] == -5.0 and data.min() == -32768.0
    np.testing.assert_array_equal(data, values.astype(np.float32))


def test_bscale_and_bzero(tmp_path: Path) -> None:
    wanted = np.arange(-12, 12, dtype=np.float64).reshape(4, 6) * 0.25 + 100.0
    hdu = fits.PrimaryHDU(wanted.copy())
    hdu.scale("int16", bscale=0.25, bzero=100.0)  # stored (wanted - 100) / 0.25 as int16
    path = write(tmp_path / "scaled.fits", hdu)
    cards, stored = stored_primary(path)
    assert cards["BITPIX"] == "16" and float(cards["BSCALE"]) == 0.25 and float(cards["BZERO"]) == 100.0
    assert stored.min() == -12 and stored.max() == 11
    data = read_frame(path).data
    np.testing.assert_array_equal(data, physical(cards, stored).astype(np.float32))
    np.testing.assert_allclose(data, wanted)


def test_nans_and_blank_pixels_stay_missing(tmp_path: Path) -> None:
    values = np.arange(20, dtype=np.float32).reshape(4, 5)
    values[1, 2] = values[3, 0] = np.nan
    data = read_frame(write(tmp_path / "nan.fits", fits.PrimaryHDU(values))).data
    np.testing.assert_array_equal(np.isnan(data), np.isnan(values))
    np.testing.assert_array_equal(data[~np.isnan(data)], values[~np.isnan(values)])
    integers = fits.PrimaryHDU(np.array([[1, -32768], [3, 4]], np.int16))
    integers.header["BLANK"] = -32768
    blank = read_frame(write(tmp_path / "blank.fits", integers)).data
    assert np.isnan(blank[0, 1]) and blank[1, 1] == 4.0


def test_gzip_file_and_bytes(tmp_path: Path) -> None:
    values = RNG.integers(-500, 500, (6, 9)).astype(np.int16)
    plain = write(tmp_path / "g.fits", fits.PrimaryHDU(values))
    zipped = tmp_path / "g.fits.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_frame(zipped).data, values)
    np.testing.assert_array_equal(read_frame(zipped.read_bytes()).data, values)
    np.testing.assert_array_equal(read_frame(plain.read_bytes()).data, values)


@pytest.mark.parametrize(
    ("values", "options"),
    [
        (RNG.integers(0, 65536, (40, 50)).astype(np.uint16), {"compression_type": "RICE_1"}),
        (RNG.integers(-3000, 3000, (40, 50)).astype(np.int16), {"compression_type": "RICE_1"}),
        (RNG.integers(-(2**30), 2**30, (40, 50)).astype(np.int32), {"compression_type": "GZIP_1"}),
        (
            RNG.normal(0, 50, (40, 50)).astype(np.float32),
            {"compression_type": "GZIP_2", "quantize_level": 0.0},
        ),
    ],
)
def test_tile_compressed_fz(tmp_path: Path, values: np.ndarray, options: dict[str, object]) -> None:
    path = write(
        tmp_path / "f.fits.fz", fits.CompImageHDU(values, name="SCI", tile_shape=(16, 50), **options)
    )
    with fits.open(path, disable_image_compression=True) as raw:  # really a compressed binary table
        assert isinstance(raw[1], fits.BinTableHDU) and raw[1].header["ZIMAGE"] is True
    frame = read_frame(path)
    assert (frame.hdu_index, frame.hdu_name) == (1, "SCI")
    np.testing.assert_array_equal(frame.data, values.astype(np.float32))
    np.testing.assert_array_equal(read_frame(path, hdu="sci").data, frame.data)


def test_named_and_indexed_hdus(tmp_path: Path) -> None:
    dark = np.full((4, 4), 1.0, np.float32)
    science = np.full((4, 4), 2.0, np.float32)
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.zeros(3))], name="CAT")
    path = write(
        tmp_path / "mef.fits",
        fits.ImageHDU(dark, name="DARK"),
        table,
        fits.ImageHDU(science, name="SCI"),
        fits.ImageHDU(name="EMPTY"),
    )
    assert read_frame(path).hdu_name == "DARK"  # the first image HDU with data
    chosen = read_frame(path, hdu="Sci")
    assert (chosen.hdu_index, chosen.hdu_name) == (3, "SCI") and chosen.data[0, 0] == 2.0
    assert read_frame(path, hdu=3).data[0, 0] == 2.0
    cases: list[tuple[int | str, str]] = [
        ("FLAT", r"has no HDU named 'FLAT' \(HDUs: 0 PRIMARY PrimaryHDU, 1 DARK ImageHDU, 2 CAT BinTableHDU"),
        (7, r"has no HDU 7: it has 5"),
        ("CAT", r"HDU 2 \(CAT\) is a BinTableHDU, not an image"),
        ("EMPTY", r"HDU 4 \(EMPTY\) holds no image data \(NAXIS = 0\)"),
        (0, r"HDU 0 \(PRIMARY\) holds no image data"),
    ]
    for hdu, message in cases:
        with pytest.raises(UserError, match=message):
            read_frame(path, hdu=hdu)


def test_size_one_axes_are_dropped(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_array_equal(
        read_frame(write(tmp_path / "c.fits", fits.PrimaryHDU(values))).data, values[0]
    )


def header_only(cards: dict[str, object]) -> bytes:
    """A primary header with ``cards``, padded to one block, as bytes (no data)."""
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    return header.tostring().encode("ascii")


def test_bad_inputs_say_what_is_wrong(tmp_path: Path) -> None:
    good = write(tmp_path / "good.fits", fits.PrimaryHDU(np.ones((64, 64), np.float32))).read_bytes()
    files: dict[str, bytes] = {
        "text.fits": b"this is not a telescope frame\n" * 10,
        "png.fits": b"\x89PNG\r\n\x1a\n" + bytes(100),
        "empty.fits": b"",
        "cut-data.fits": good[: BLOCK + 100],
        "cut-header.fits": good[:200],  # before the END card
        "no-image.fits": write(tmp_path / "p.fits", fits.PrimaryHDU()).read_bytes(),
        "cube.fits": write(
            tmp_path / "q.fits", fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32))
        ).read_bytes(),
        "pixel.fits": write(tmp_path / "r.fits", fits.PrimaryHDU(np.ones((1, 1), np.int16))).read_bytes(),
        "line.fits": write(tmp_path / "s.fits", fits.PrimaryHDU(np.ones((1, 9), np.int16))).read_bytes(),
        "huge.fits": header_only(
            {"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 100_000, "NAXIS2": 100_000}
        )
        + bytes(BLOCK),
        "negative.fits": header_only({"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 4, "NAXIS2": -4}),
        "bitpix.fits": header_only({"SIMPLE": True, "BITPIX": 12, "NAXIS": 2, "NAXIS1": 4, "NAXIS2": 4}),
        "broken.fits.gz": gzip.compress(good)[:200],
        "empty.fits.gz": gzip.compress(b""),
    }
    expected = {
        "text.fits": r"is not a FITS file: it starts with 'this is not a telesc'",
        "png.fits": r"is not a FITS file",
        "empty.fits": r"is empty \(0 bytes\); expected a FITS file",
        "cut-data.fits": r"is truncated: HDU 0's header \(BITPIX -32, NAXIS 64 x 64\) claims 16384 bytes of "
        r"data but the file holds only 100",
        "cut-header.fits": r"is truncated: the header of HDU 0 \(at byte 0\) has no END card",
        "no-image.fits": r"holds no image data: no HDU is an image with pixels "
        r"\(HDUs: 0 PRIMARY PrimaryHDU\)",
        "cube.fits": r"HDU 0 \(PRIMARY\): the image is a 3-D cube of 3 planes of 8 x 8 pixels \(3 x 8 x 8\); "
        r"expected one 2-D frame",
        "pixel.fits": r"the image is a single pixel \(1 x 1\); expected a 2-D frame",
        "line.fits": r"the image is 1-D \(1 x 9 pixels\)",
        "huge.fits": r"is truncated: .*NAXIS 100000 x 100000\) claims 20000000000 bytes of data but the file "
        r"holds only 2880",
        "negative.fits": r"declares NAXIS = 2 but NAXIS2 = -4; each NAXISn must be a whole number >= 0",
        "bitpix.fits": r"broken header \(BITPIX 12, NAXIS 2\)",
        "broken.fits.gz": r"truncated or corrupt gzip stream",
        "empty.fits.gz": r"the gzip stream is empty \(0 bytes\)",
    }
    assert expected.keys() == files.keys()
    for name, raw in files.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(UserError, match=expected[name]) as caught:
            read_frame(path)
        assert str(caught.value).startswith(f"FITS file {path}"), name
        with pytest.raises(UserError, match=expected[name]):
            read_frame(raw)  # the same answer for bytes (a queue message's payload)


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"FITS file .*nowhere\.fits does not exist"):
        read_frame(tmp_path / "nowhere.fits")
    with pytest.raises(UserError, match=r"is a directory, not a FITS file"):
        read_frame(tmp_path)
    path = write(tmp_path / "f.fits", fits.PrimaryHDU(np.ones((4, 4))))
    with pytest.raises(UserError, match=r"hdu must be an index or an EXTNAME, got 1.5"):
        read_frame(path, hdu=1.5)  # type: ignore[arg-type]


def compressed_bytes(values: np.ndarray, **options: object) -> bytes:
    stream = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(values, **options)]).writeto(stream)
    return stream.getvalue()


def replace_card(raw: bytes, key: str, value: int) -> bytes:
    start = raw.index(key.ljust(8).encode("ascii") + b"= ")
    return raw[: start + 10] + str(value).rjust(20).encode("ascii") + raw[start + 30 :]


def test_corrupt_or_lying_compressed_images(tmp_path: Path) -> None:
    values = (np.arange(64 * 64).reshape(64, 64) % 300).astype(np.int16)
    raw = compressed_bytes(values, compression_type="RICE_1")
    corrupt = bytearray(raw)
    heap_end = len(raw.rstrip(b"\0"))
    for i in range(heap_end - 400, heap_end, 3):
        corrupt[i] ^= 0xFF
    with pytest.raises(UserError, match=r"cannot read the FITS image, the file is corrupt"):
        read_frame(bytes(corrupt))
    huge = replace_card(replace_card(raw, "ZNAXIS1", 100_000), "ZNAXIS2", 100_000)
    with pytest.raises(
        UserError,
        match=rf"compressed image declaring 100000 x 100000 pixels .* over {MAX_IMAGE_PIXELS} pixels",
    ):
        read_frame(huge)
    with pytest.raises(UserError, match=r"HDU 1 is a compressed image with a broken ZNAXIS/ZNAXISn header"):
        read_frame(replace_card(raw, "ZNAXIS", 10**9))


def test_mangled_files_only_ever_raise_user_errors() -> None:
    """Random damage to plain, gzipped and tile-compressed files: read, or refused with a UserError; never
    a numpy, zlib or decompressor exception leaking out of the reader."""
    values = RNG.normal(1000, 30, (48, 48)).astype(np.int16)
    plain = io.BytesIO()
    fits.PrimaryHDU(values).writeto(plain)
    sources = [
        plain.getvalue(),
        gzip.compress(plain.getvalue()),
        compressed_bytes(values, compression_type="RICE_1"),
        compressed_bytes(values.astype(np.float32), compression_type="GZIP_2", quantize_level=0.0),
        compressed_bytes(values, compression_type="HCOMPRESS_1"),
    ]
    damage = np.random.default_rng(11)
    refused = 0
    for source in sources:
        for trial in range(24):
            mangled = bytearray(source)
            if trial % 2:
                mangled = mangled[: damage.integers(1, len(mangled))]
            else:
                start = int(damage.integers(0, len(mangled) - 40))
                for i in range(start, start + 40):
                    mangled[i] ^= int(damage.integers(1, 256))
            try:
                read_frame(bytes(mangled))
            except UserError:
                refused += 1
    assert refused > 60  # most damage is noticed; the rest only changed pixel values
