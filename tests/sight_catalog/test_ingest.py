"""Ingesting images into a city from a folder, S3 and URLs (a server on loopback): stored turned upright and
once per city, every bad file rejected with its reason, limits kept, and URLs that reach inward refused."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image

from services.errors import UserError
from services.sight_catalog import warehouse as wh
from services.sight_catalog.ingest import (
    Limits,
    Outcome,
    RejectedError,
    check_url,
    fetch_url,
    folder_items,
    ingest,
    parse_url_list,
    prepare,
    refusal,
    s3_items,
    url_items,
)
from services.sight_catalog.photos import draw_photo, exif_oriented_jpeg

LOOPBACK = Limits(allow_loopback=True)


def _jpeg(seed: int) -> bytes:
    return draw_photo(seed).jpeg()


def _webp(seed: int) -> bytes:
    out = io.BytesIO()
    draw_photo(seed).image.save(out, "WEBP", quality=80)
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _by_source(outcomes: list[Outcome]) -> dict[str, Outcome]:
    return {Path(o.source).name if not o.source.startswith(("http", "s3")) else o.source: o for o in outcomes}


def _stored(s3: Any, bucket: str, outcome: Outcome) -> Image.Image:
    assert outcome.s3_key is not None
    data = s3.get_object(Bucket=bucket, Key=outcome.s3_key)["Body"].read()
    assert hashlib.md5(data).hexdigest() == outcome.md5
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture
def paris(conn: psycopg.Connection[Any]) -> wh.City:
    """The city the tests ingest into."""
    return wh.create_city(conn, "Paris")


# --- a local folder -----------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder of images, a folder per sight, with every kind of bad file beside the good ones."""
    root = tmp_path / "paris"
    (root / "Eiffel Tower").mkdir(parents=True)
    (root / "Arc de Triomphe").mkdir()
    (root / "Eiffel Tower" / "a.jpg").write_bytes(_jpeg(1))
    (root / "Eiffel Tower" / "b.png").write_bytes(draw_photo(2).png())
    (root / "Arc de Triomphe" / "c.webp").write_bytes(_webp(3))
    (root / "Arc de Triomphe" / "upright.JPEG").write_bytes(exif_oriented_jpeg(draw_photo(4).image, 6))
    (root / "top.jpg").write_bytes(_jpeg(5))
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(_jpeg(6)[:3000])
    (root / "text.jpg").write_bytes(b"<html><body>not a photo</body></html>")
    (root / "notes.txt").write_text("not an image")
    (root / "jpeg-named.png").write_bytes(_jpeg(7))
    (root / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (root / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 40)
    (root / ".hidden.jpg").write_bytes(_jpeg(8))
    (root / ".git").mkdir()
    (root / ".git" / "x.jpg").write_bytes(_jpeg(9))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(_jpeg(10))
    (root / "escape.jpg").symlink_to(outside)
    (root / "z-alias.jpg").symlink_to(root / "top.jpg")
    (root / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(root / "pipe.jpg")
    return root


def test_a_folder_is_ingested_with_a_reason_for_every_file(
    conn: psycopg.Connection[Any], paris: wh.City, folder: Path, datasets: str, s3: Any
) -> None:
    calls: list[tuple[int, int, str]] = []
    report = ingest(
        conn,
        paris,
        folder_items(folder),
        bucket=datasets,
        s3_client=s3,
        progress=lambda done, total, outcome: calls.append((done, total, outcome.status)),
    )
    got = _by_source(report.outcomes)
    assert {name for name, o in got.items() if o.status == "accepted"} == {
        "a.jpg", "b.png", "c.webp", "upright.JPEG", "top.jpg",
    }  # fmt: skip
    assert got["z-alias.jpg"].status == "duplicate" and got["z-alias.jpg"].image_id == got["top.jpg"].image_id
    reasons = {name: o.reason for name, o in got.items() if o.status == "rejected"}
    assert reasons.keys() == {
        "empty.jpg", "truncated.jpg", "text.jpg", "notes.txt", "jpeg-named.png", "bomb.png", "anim.gif",
        ".hidden.jpg", "escape.jpg", "elsewhere", "pipe.jpg", "dangling.jpg",
    }  # fmt: skip
    assert reasons["empty.jpg"] == "the file is empty"
    assert "cannot decode a JPEG image" in str(reasons["truncated.jpg"])
    assert "not a JPEG, PNG or WebP image (an HTML page" in str(reasons["text.jpg"])
    assert "not an image name (.txt)" in str(reasons["notes.txt"])
    assert reasons["jpeg-named.png"] == "claims to be a PNG image but holds a JPEG"
    assert "too many pixels" in str(reasons["bomb.png"]) or "over the limit" in str(reasons["bomb.png"])
    assert "not an image name (.gif)" in str(reasons["anim.gif"])
    assert reasons[".hidden.jpg"] == "a hidden file"
    assert "outside" in str(reasons["escape.jpg"])
    assert reasons["elsewhere"] == "a linked folder, not followed"
    assert reasons["pipe.jpg"] == "not a plain file"
    assert str(reasons["dangling.jpg"]).startswith("a broken link")
    assert not any(".git" in o.source for o in report.outcomes)
    assert report.summary() == "Paris: 5 accepted, 1 duplicates, 12 rejected, 0 skipped"
    assert calls[-1] == (len(report.outcomes), len(report.outcomes), report.outcomes[-1].status)
    # Stored where the catalog keeps images, in the warehouse with its sight and source.
    tower = wh.get_sight(conn, paris, "Eiffel Tower")
    arc = wh.get_sight(conn, paris, "Arc de Triomphe")
    rows = {Path(i.source).name: i for i in wh.list_images(conn, paris.id).items}
    assert rows.keys() == {"a.jpg", "b.png", "c.webp", "upright.JPEG", "top.jpg"}
    assert (rows["a.jpg"].sight_id, rows["c.webp"].sight_id, rows["top.jpg"].sight_id) == (
        tower.id,
        arc.id,
        None,
    )
    assert rows["a.jpg"].source == str(folder / "Eiffel Tower" / "a.jpg")
    assert (rows["b.png"].media_type, rows["c.webp"].media_type) == ("image/png", "image/jpeg")
    for name, row in rows.items():
        assert row.s3_key == f"catalog/paris/images/{row.md5}.{'png' if name == 'b.png' else 'jpg'}"
        image = _stored(s3, datasets, got[name])
        assert (image.width, image.height) == (row.width, row.height)
        assert row.size_bytes == s3.head_object(Bucket=datasets, Key=row.s3_key)["ContentLength"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=datasets)["Contents"]]
    assert len(keys) == 5 and all(k.startswith("catalog/paris/images/") for k in keys)


def test_ingesting_again_adds_nothing(
    conn: psycopg.Connection[Any], paris: wh.City, tmp_path: Path, datasets: str, s3: Any
) -> None:
    (tmp_path / "Eiffel Tower").mkdir()
    for n in range(3):
        (tmp_path / "Eiffel Tower" / f"{n}.jpg").write_bytes(_jpeg(n))
    first = ingest(conn, paris, folder_items(tmp_path), bucket=datasets, s3_client=s3)
    again = ingest(conn, paris, folder_items(tmp_path), bucket=datasets, s3_client=s3)
    assert len(first.accepted) == 3 and len(again.duplicates) == 3 and not again.accepted
    assert [o.image_id for o in again.duplicates] == [o.image_id for o in first.accepted]
    assert wh.count_images(conn, paris.id) == 3
    # Another city holds its own copy.
    rome = wh.create_city(conn, "Rome")
    assert len(ingest(conn, rome, folder_items(tmp_path), bucket=datasets, s3_client=s3).accepted) == 3


def test_exif_orientation_is_applied_to_the_stored_image(
    conn: psycopg.Connection[Any], paris: wh.City, tmp_path: Path, datasets: str, s3: Any
) -> None:
    photo = draw_photo(4)
    data = exif_oriented_jpeg(photo.image, 6)
    (tmp_path / "turned.jpg").write_bytes(data)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (photo.image.height, photo.image.width)  # on its side as stored
        sideways = raw.convert("RGB")
    (outcome,) = ingest(conn, paris, folder_items(tmp_path), bucket=datasets, s3_client=s3).outcomes
    assert outcome.status == "accepted"
    row = wh.get_image(conn, int(outcome.image_id or 0))
    assert (row.width, row.height) == photo.image.size  # swapped back
    stored = _stored(s3, datasets, outcome)
    assert stored.size == photo.image.size
    assert stored.getexif().get(0x0112) is None  # turned for real; no tag left to turn it again
    assert _difference(stored, photo.image) < 3
    assert _difference(stored, sideways.rotate(-90, expand=True).rotate(180)) > 10  # not upside down


def _difference(a: Image.Image, b: Image.Image) -> float:
    small = [
        np.asarray(i.convert("RGB").resize((48, 36), Image.Resampling.BOX), dtype=np.float32) for i in (a, b)
    ]
    return float(np.abs(small[0] - small[1]).mean())


def test_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        folder_items(tmp_path / "nowhere")


# --- limits -------------------------------------------------------------------------------------------------


def test_limits_per_sight_and_per_city_stop_and_say_so(
    conn: psycopg.Connection[Any], paris: wh.City, tmp_path: Path, datasets: str, s3: Any
) -> None:
    for sight, seeds in (("Eiffel Tower", range(4)), ("Louvre", range(10, 14))):
        (tmp_path / sight).mkdir()
        for n in seeds:
            (tmp_path / sight / f"{n}.jpg").write_bytes(_jpeg(n))
    report = ingest(
        conn,
        paris,
        folder_items(tmp_path),
        bucket=datasets,
        s3_client=s3,
        limits=Limits(per_sight=2, per_city=3),
    )
    statuses = [(o.sight, o.status) for o in report.outcomes]
    assert statuses == [
        ("Eiffel Tower", "accepted"), ("Eiffel Tower", "accepted"), ("Eiffel Tower", "skipped"),
        ("Eiffel Tower", "skipped"), ("Louvre", "accepted"), (None, "skipped"), (None, "skipped"),
        (None, "skipped"),
    ]  # fmt: skip
    assert report.skipped[0].reason == "the sight reached its limit of 2 images"
    assert report.skipped[-1].reason == "the city reached its limit of 3 images"
    assert report.notes == [
        "Eiffel Tower holds 2 images, its limit (2); the rest is skipped",
        "Paris holds 3 images, its limit (3); the rest is skipped",
    ]
    assert wh.count_images(conn, paris.id) == 3
    # The limits count what the city holds already.
    again = ingest(
        conn, paris, folder_items(tmp_path), bucket=datasets, s3_client=s3, limits=Limits(per_city=3)
    )
    assert {o.status for o in again.outcomes} == {"skipped"}


def test_size_and_pixel_limits(
    conn: psycopg.Connection[Any], paris: wh.City, tmp_path: Path, datasets: str, s3: Any
) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg(1))
    small = ingest(
        conn, paris, folder_items(tmp_path), bucket=datasets, s3_client=s3, limits=Limits(max_bytes=500)
    )
    assert "over the limit of 500" in str(small.rejected[0].reason)
    few = ingest(
        conn, paris, folder_items(tmp_path), bucket=datasets, s3_client=s3, limits=Limits(max_pixels=10_000)
    )
    assert few.rejected[0].reason == "384 x 288 pixels is over the limit of 10000 pixels"


def test_prepare_keeps_png_as_png_and_re_encodes_the_rest_as_jpeg() -> None:
    photo = draw_photo(3)
    png = prepare(photo.png())
    assert png.media_type == "image/png" and hashlib.md5(png.data).hexdigest() == png.md5
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.data))), np.asarray(photo.image))
    webp = prepare(_webp(3), "image/webp")
    assert webp.media_type == "image/jpeg" and webp.data.startswith(b"\xff\xd8")
    out = io.BytesIO()
    photo.image.convert("CMYK").save(out, "JPEG")
    cmyk = prepare(out.getvalue())
    assert Image.open(io.BytesIO(cmyk.data)).mode == "RGB"
    out = io.BytesIO()
    photo.image.convert("RGBA").save(out, "PNG")
    assert Image.open(io.BytesIO(prepare(out.getvalue()).data)).mode == "RGBA"
    assert prepare(photo.png()).md5 == png.md5  # the same file, the same stored bytes
    for bad, reason in (
        (b"", "the file is empty"),
        (b"GIF89a" + b"\0" * 20, "a GIF"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 20, "cannot decode a JPEG image"),
        (_png_header(7000, 7000), "7000 x 7000 pixels is over the limit"),
    ):
        with pytest.raises(RejectedError, match=reason):
            prepare(bad)


# --- S3 -----------------------------------------------------------------------------------------------------


def test_an_s3_prefix_is_ingested(
    conn: psycopg.Connection[Any], paris: wh.City, resources: Any, datasets: str, s3: Any
) -> None:
    imagery = resources.buckets["imagery"]
    for key, body in (
        ("incoming/paris/Eiffel Tower/1.jpg", _jpeg(1)),
        ("incoming/paris/Eiffel Tower/2.png", draw_photo(2).png()),
        ("incoming/paris/loose.jpg", _jpeg(3)),
        ("incoming/paris/readme.txt", b"hello"),
        ("incoming/paris/broken.jpg", b"\xff\xd8\xff garbage"),
        ("incoming/paris/", b""),
        ("incoming/paris-other/x.jpg", _jpeg(4)),
    ):
        s3.put_object(Bucket=imagery, Key=key, Body=body)
    items = s3_items(f"s3://{imagery}/incoming/paris", client=s3)
    assert [(i.source.rsplit("/", 1)[-1], i.sight) for i in items] == [
        ("1.jpg", "Eiffel Tower"), ("2.png", "Eiffel Tower"), ("broken.jpg", None), ("loose.jpg", None),
        ("readme.txt", None),
    ]  # fmt: skip
    report = ingest(conn, paris, items, bucket=datasets, s3_client=s3)
    got = {o.source: o for o in report.outcomes}
    base = f"s3://{imagery}/incoming/paris/"
    assert [got[base + n].status for n in ("Eiffel Tower/1.jpg", "Eiffel Tower/2.png", "loose.jpg")] == [
        "accepted"
    ] * 3
    assert "cannot decode" in str(got[base + "broken.jpg"].reason)
    assert "not an image name" in str(got[base + "readme.txt"].reason)
    assert {i.source for i in wh.list_images(conn, paris.id).items} == {
        base + "Eiffel Tower/1.jpg", base + "Eiffel Tower/2.png", base + "loose.jpg",
    }  # fmt: skip
    # One object by its key.
    (one,) = s3_items(f"s3://{imagery}/incoming/paris/loose.jpg", client=s3)
    assert one.source == base + "loose.jpg" and one.sight is None


def test_bad_s3_sources_are_user_errors(resources: Any, s3: Any) -> None:
    with pytest.raises(UserError, match="does not exist"):
        s3_items("s3://no-such-bucket-here/x/", client=s3)
    with pytest.raises(UserError, match="is not a bucket name"):
        s3_items("s3://Bad_Bucket/x/", client=s3)
    with pytest.raises(UserError, match="holds no objects"):
        s3_items(f"s3://{resources.buckets['imagery']}/nothing/", client=s3)
    with pytest.raises(UserError, match="not an S3 URL"):
        s3_items("https://example.com/x", client=s3)


# --- URLs ---------------------------------------------------------------------------------------------------


def test_urls_are_fetched_and_checked(
    conn: psycopg.Connection[Any], paris: wh.City, web: Any, datasets: str, s3: Any
) -> None:
    jpeg, png = _jpeg(1), draw_photo(2).png()
    web.serve("/a.jpg", jpeg, Content_Type="image/jpeg")
    web.serve("/b", png, Content_Type="image/png; charset=binary")
    web.serve("/plain", _jpeg(3), Content_Type="application/octet-stream")
    web.serve("/page", b"<html></html>", Content_Type="text/html")
    web.serve("/lying.png", _jpeg(4), Content_Type="image/png")
    web.serve("/moved", status=302, Location="/a2.jpg")
    web.serve("/a2.jpg", _jpeg(5), Content_Type="image/jpeg")
    web.serve("/to-metadata", status=302, Location="http://169.254.169.254/latest/meta-data/")
    web.serve("/loop", status=302, Location="/loop")
    web.serve("/big.jpg", b"\xff\xd8\xff" + b"\0" * 5000, Content_Type="image/jpeg")
    web.serve("/gzip.jpg", jpeg, Content_Type="image/jpeg", Content_Encoding="gzip")
    entries = [(web.url(p), "Eiffel Tower" if p == "/a.jpg" else None) for p in (
        "/a.jpg", "/b", "/plain", "/page", "/lying.png", "/moved", "/to-metadata", "/loop", "/big.jpg",
        "/gzip.jpg", "/missing.jpg",
    )]  # fmt: skip
    report = ingest(conn, paris, url_items(entries), bucket=datasets, s3_client=s3, limits=LOOPBACK)
    got = {o.source.rsplit("/", 1)[-1]: o for o in report.outcomes}
    assert [n for n, o in got.items() if o.status == "accepted"] == ["a.jpg", "b", "plain", "moved"]
    assert got["a.jpg"].sight == "Eiffel Tower"
    assert got["page"].reason == "the server sent text/html, not a JPEG, PNG or WebP image"
    assert got["lying.png"].reason == "claims to be a PNG image but holds a JPEG"
    assert "169.254.169.254 is a link-local address" in str(got["to-metadata"].reason)
    assert got["loop"].reason == "more than 3 redirects"
    assert "cannot decode" in str(got["big.jpg"].reason)
    assert got["gzip.jpg"].reason == "the server sent it gzip-encoded"
    assert got["missing.jpg"].reason == "HTTP 404 Not Found"
    rows = {i.source: i for i in wh.list_images(conn, paris.id).items}
    assert rows[web.url("/moved")].md5 == got["moved"].md5  # recorded under the URL asked for
    with pytest.raises(RejectedError, match="over the limit of 4000"):
        fetch_url(web.url("/big.jpg"), Limits(allow_loopback=True, max_bytes=4000))
    web.serve("/huge.jpg", Content_Type="image/jpeg", Content_Length="999999999")
    with pytest.raises(RejectedError, match="999999999 bytes, over the limit"):
        fetch_url(web.url("/huge.jpg"), LOOPBACK)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http and https URLs are fetched, not file"),
        ("ftp://example.com/a.jpg", "only http and https URLs are fetched, not ftp"),
        ("/etc/passwd", "not a bare path"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[fe80::1]/", "is a link-local address"),
        ("http://10.0.0.7/a.jpg", "10.0.0.7 is a private address"),
        ("http://192.168.1.1/a.jpg", "192.168.1.1 is a private address"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "127.0.0.1 is a loopback address"),
        ("http://2130706433/a.jpg", "127.0.0.1 is a loopback address"),
        ("http://0.0.0.0/a.jpg", "not a public address"),
        ("http://100.64.0.1/a.jpg", "not a public address"),
        ("http://224.0.0.1/a.jpg", "not a public address"),
        ("http://user:secret@example.com/a.jpg", "with credentials"),
        ("http:///a.jpg", "names no host"),
        ("http://example.com:99999/", "is not a URL"),
    ],
)
def test_urls_that_reach_inward_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UserError, match=reason.replace(".", r"\.").replace("[", r"\[")):
        check_url(url)


def test_loopback_is_refused_unless_allowed(
    conn: psycopg.Connection[Any], paris: wh.City, web: Any, datasets: str, s3: Any
) -> None:
    web.serve("/a.jpg", _jpeg(1), Content_Type="image/jpeg")
    urls = [web.url("/a.jpg"), web.url("/a.jpg", host="localhost"), f"http://[::1]:{web.port}/a.jpg"]
    urls += ["file:///etc/passwd", "http://169.254.169.254/latest/meta-data/iam/"]
    report = ingest(conn, paris, url_items(urls), bucket=datasets, s3_client=s3)
    assert [o.status for o in report.outcomes] == ["rejected"] * 5
    assert [("loopback" in str(o.reason)) for o in report.outcomes] == [True, True, True, False, False]
    assert "only http and https" in str(report.outcomes[3].reason)
    assert "link-local" in str(report.outcomes[4].reason)
    assert web.requests == []  # nothing was asked of the server
    allowed = ingest(conn, paris, url_items(urls[:1]), bucket=datasets, s3_client=s3, limits=LOOPBACK)
    assert allowed.outcomes[0].status == "accepted" and web.requests == ["/a.jpg"]


def test_refusal_of_addresses() -> None:
    assert refusal("8.8.8.8") is None
    assert refusal("2606:4700:4700::1111") is None
    assert refusal("127.0.0.1", allow_loopback=True) is None
    assert refusal("::1") == "::1 is a loopback address"
    assert refusal("10.1.2.3", allow_loopback=True) == "10.1.2.3 is a private address"


def test_url_lists() -> None:
    text = "# sights of Paris\nhttps://e.com/a.jpg\tEiffel Tower\n\n  https://e.com/b.jpg  \n"
    assert parse_url_list(text) == [("https://e.com/a.jpg", "Eiffel Tower"), ("https://e.com/b.jpg", None)]
    assert [(i.source, i.sight) for i in url_items(parse_url_list(text))] == parse_url_list(text)
