"""The sight catalog's warehouse on a real PostgreSQL: names that are only names, slugs, de-duplicated
images, model versions (one training at a time), pages, and marts refreshed without blocking readers."""

from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
import pytest

from services.cloud.database import connect
from services.errors import UserError
from services.sight_catalog import warehouse as wh

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MD5 = "0123456789abcdef0123456789abcdef"


def _md5(n: int) -> str:
    return f"{n:032x}"


def _image(conn: psycopg.Connection[Any], city: wh.City, n: int, **kwargs: Any) -> tuple[wh.Image, bool]:
    md5 = _md5(n)
    return wh.add_image(
        conn,
        city.id,
        md5=md5,
        s3_key=wh.image_key(city.slug, md5, "image/jpeg"),
        source=f"https://example.com/{n}.jpg",
        media_type="image/jpeg",
        width=640,
        height=480,
        size_bytes=1000 + n,
        **kwargs,
    )


# --- names and slugs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("São Paulo", "sao-paulo"),
        ("Zürich", "zurich"),
        ("Kraków", "krakow"),
        ("Straße des 17. Juni", "strasse-des-17-juni"),
        ("Øresund", "oresund"),
        ("'; DROP TABLE x; --", "drop-table-x"),
        ("<script>alert(1)</script>", "script-alert-1-script"),
        ("北京", "city"),
        ("  New   York  ", "new-york"),
    ],
)
def test_slugs_are_sane_ascii(name: str, slug: str) -> None:
    assert wh.slugify(name) == slug
    assert SLUG.match(wh.slugify(name))


def test_a_long_name_gets_a_slug_within_the_limit() -> None:
    slug = wh.slugify("Llanfair " * 11)
    assert SLUG.match(slug) and len(slug) <= wh.MAX_SLUG and not slug.endswith("-")


TRICKY = [
    "True",
    "null",
    "None",
    "0",
    "'; DROP TABLE x; --",
    "<script>",
    "Robert'); --",
    "%s",
    "{0}",
    "\\x00",
]


def test_tricky_names_are_just_names(conn: psycopg.Connection[Any]) -> None:
    made = {name: wh.create_city(conn, name) for name in TRICKY}
    for name, city in made.items():
        assert isinstance(city.name, str) and city.name == name
        again = wh.get_city(conn, name)
        assert again == city and again.name == name
        assert SLUG.match(city.slug)
    assert made["True"].name != "true" and made["True"].name is not True
    assert made["null"].name == "null"
    assert len({c.slug for c in made.values()}) == len(TRICKY)
    listed = wh.list_cities(conn, limit=100).items
    assert [c.name for c in listed] == TRICKY
    # The tables are all still there.
    assert conn.execute("SELECT count(*) FROM sight_cities").fetchone() == (len(TRICKY),)


def test_names_compare_case_insensitively_and_are_stored_as_given(conn: psycopg.Connection[Any]) -> None:
    paris, new = wh.request_city(conn, "Paris", requested_by="ana")
    assert new and paris.name == "Paris" and paris.slug == "paris" and paris.requested_by == "ana"
    again, new = wh.request_city(conn, "PARIS")
    assert not new and again == paris
    assert wh.get_city(conn, "pArIs") == paris
    assert wh.get_city(conn, "paris") == paris
    with pytest.raises(UserError, match="exists already"):
        wh.create_city(conn, "paris")
    zurich = wh.create_city(conn, "Zürich")
    assert wh.get_city(conn, "ZÜRICH") == zurich
    assert wh.get_city(conn, "zurich") == zurich  # by its slug
    with pytest.raises(UserError, match="no city called 'Atlantis'"):
        wh.get_city(conn, "Atlantis")
    with pytest.raises(UserError, match="no city with id"):
        wh.city_by_id(conn, 999)


def test_slug_collisions_get_a_suffix(conn: psycopg.Connection[Any]) -> None:
    assert wh.create_city(conn, "Zürich").slug == "zurich"
    assert wh.create_city(conn, "Zurich").slug == "zurich-2"
    assert wh.create_city(conn, "Zürich!").slug == "zurich-3"
    assert [wh.create_city(conn, n).slug for n in ("北京", "東京", "서울")] == ["city", "city-2", "city-3"]
    long = "x" * 63
    assert wh.create_city(conn, long).slug == long
    second = wh.create_city(conn, long + "!").slug
    assert second == "x" * 61 + "-2" and SLUG.match(second)


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "empty"), ("   ", "empty"), ("x" * 101, "at most 100"), ("a\x00b", "control"), ("a\nb", "control")],
)
def test_bad_names_are_refused(conn: psycopg.Connection[Any], name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        wh.request_city(conn, name)


def test_a_name_that_is_not_text_is_refused(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(UserError, match="text, not int"):
        wh.request_city(conn, 42)  # type: ignore[arg-type]


def test_requesting_a_city_twice_at_once_makes_one(conn: psycopg.Connection[Any], database_url: str) -> None:
    results: list[tuple[wh.City, bool]] = []
    barrier = threading.Barrier(4)

    def ask() -> None:
        with connect(database_url) as own:
            barrier.wait()
            results.append(wh.request_city(own, "Lisbon"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({city.id for city, _ in results}) == 1
    assert sum(new for _, new in results) == 1
    assert conn.execute("SELECT count(*) FROM sight_cities").fetchone() == (1,)


# --- sights and images --------------------------------------------------------------------------------------


def test_sights(conn: psycopg.Connection[Any]) -> None:
    paris = wh.create_city(conn, "Paris")
    tower, new = wh.add_sight(conn, paris.id, "Eiffel Tower")
    assert new and tower.name == "Eiffel Tower"
    assert wh.add_sight(conn, paris.id, "Eiffel Tower") == (tower, False)
    wh.add_sight(conn, paris.id, "Arc de Triomphe")
    assert [s.name for s in wh.list_sights(conn, paris.id)] == ["Arc de Triomphe", "Eiffel Tower"]
    assert wh.get_sight(conn, paris, "Eiffel Tower") == tower
    with pytest.raises(UserError, match=r"no sight called 'Louvre'.*Arc de Triomphe, Eiffel Tower"):
        wh.get_sight(conn, paris, "Louvre")
    with pytest.raises(UserError, match="no city with id 999"):
        wh.add_sight(conn, 999, "Big Ben")
    # Same name, another city: another sight.
    rome = wh.create_city(conn, "Rome")
    assert wh.add_sight(conn, rome.id, "Eiffel Tower")[0].id != tower.id


def test_images_are_recorded_once_per_city_and_md5(conn: psycopg.Connection[Any]) -> None:
    paris, rome = wh.create_city(conn, "Paris"), wh.create_city(conn, "Rome")
    tower, _ = wh.add_sight(conn, paris.id, "Eiffel Tower")
    first, new = _image(conn, paris, 1, sight_id=tower.id)
    assert new and first.sight_id == tower.id and first.s3_key == f"catalog/paris/images/{_md5(1)}.jpg"
    again, new = _image(conn, paris, 1)
    assert not new and again == first
    elsewhere, new = _image(conn, rome, 1)
    assert new and elsewhere.id != first.id
    assert wh.find_image(conn, paris.id, _md5(1)) == first
    assert wh.find_image(conn, paris.id, _md5(2)) is None
    assert wh.get_image(conn, first.id) == first
    with pytest.raises(UserError, match="no image with id"):
        wh.get_image(conn, 10**9)
    assert wh.count_images(conn, paris.id) == 1
    assert wh.count_images(conn, paris.id, sight_id=tower.id) == 1


def test_image_keys_stay_under_the_catalog_prefix(conn: psycopg.Connection[Any]) -> None:
    assert wh.image_key("sao-paulo", MD5, "image/png") == f"catalog/sao-paulo/images/{MD5}.png"
    for slug, md5, media_type in (
        ("../x", MD5, "image/png"),
        ("ok", "../../etc", "image/png"),
        ("ok", MD5, "x"),
    ):
        with pytest.raises(ValueError, match="no image key"):
            wh.image_key(slug, md5, media_type)
    city = wh.create_city(conn, "Oslo")
    with pytest.raises(ValueError, match="under catalog/"):
        wh.add_image(
            conn, city.id, md5=MD5, s3_key="models/x.jpg", source="s", media_type="image/jpeg",
            width=1, height=1, size_bytes=1,
        )  # fmt: skip


def test_pages_cover_everything_once_in_order(conn: psycopg.Connection[Any]) -> None:
    city = wh.create_city(conn, "Paris")
    tower, _ = wh.add_sight(conn, city.id, "Eiffel Tower")
    made = [_image(conn, city, n, sight_id=tower.id if n % 2 else None)[0].id for n in range(7)]
    seen: list[int] = []
    after: int | None = None
    pages = 0
    while True:
        page = wh.list_images(conn, city.id, limit=3, after=after)
        seen += [i.id for i in page.items]
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == made and pages == 3
    assert [i.id for i in wh.list_images(conn, city.id, sight_id=tower.id).items] == made[1::2]
    assert wh.set_held_out(conn, made[:2]) == 2
    assert wh.set_held_out(conn, made[:2]) == 0
    assert [i.id for i in wh.list_images(conn, city.id, held_out=True).items] == made[:2]
    assert len(wh.list_images(conn, city.id, held_out=False).items) == 5
    # Exactly a page's worth: no next page.
    assert wh.list_images(conn, city.id, limit=7).next_after is None
    for limit in (0, -1, wh.MAX_PAGE + 1):
        with pytest.raises(UserError, match="a page holds"):
            wh.list_images(conn, city.id, limit=limit)


def test_cities_are_listed_in_pages(conn: psycopg.Connection[Any]) -> None:
    names = [f"City {n}" for n in range(5)]
    for name in names:
        wh.create_city(conn, name)
    first = wh.list_cities(conn, limit=2)
    second = wh.list_cities(conn, limit=2, after=first.next_after)
    third = wh.list_cities(conn, limit=2, after=second.next_after)
    assert [c.name for c in first.items + second.items + third.items] == names
    assert third.next_after is None


# --- models -------------------------------------------------------------------------------------------------


def _start(conn: psycopg.Connection[Any], city: wh.City, job: str) -> wh.Model:
    return wh.start_model(
        conn,
        city.id,
        training_job_id=job,
        dataset=f"s3://datasets/catalog/{city.slug}/datasets/{job}",
        classes=["Eiffel Tower", "Arc de Triomphe"],
        images=40,
        registry_name=f"sights-{city.slug}",
    )


def test_models_are_versioned_and_one_trains_at_a_time(conn: psycopg.Connection[Any]) -> None:
    paris, rome = wh.create_city(conn, "Paris"), wh.create_city(conn, "Rome")
    assert wh.next_model_version(conn, paris.id) == 1
    first = _start(conn, paris, "job-1")
    assert (first.version, first.status, first.classes) == (
        1,
        "TRAINING",
        ["Eiffel Tower", "Arc de Triomphe"],
    )
    assert wh.training_model(conn, paris.id) == first
    with pytest.raises(UserError, match=r"has a model training already.*version 1, job job-1"):
        _start(conn, paris, "job-2")
    assert _start(conn, rome, "job-r1").version == 1  # another city trains beside it
    failed = wh.mark_model_failed(conn, first.id, "out of memory")
    assert (failed.status, failed.reason) == ("FAILED", "out of memory")
    assert wh.mark_model_failed(conn, first.id, "again") == failed  # once
    with pytest.raises(UserError, match="is FAILED; only a TRAINING model can become READY"):
        wh.mark_model_ready(conn, first.id, registry_version=1, model_uri="s3://m/1.onnx")
    assert wh.ready_model(conn, paris.id) is None
    second = _start(conn, paris, "job-2")
    assert second.version == 2
    ready = wh.mark_model_ready(
        conn, second.id, registry_version=7, model_uri="s3://models/sights-paris/7.onnx", metrics={"map": 0.8}
    )
    assert (ready.status, ready.registry_version, ready.metrics) == ("READY", 7, {"map": 0.8})
    assert wh.mark_model_ready(conn, second.id, registry_version=7, model_uri="s3://x") == ready
    with pytest.raises(UserError, match="is READY; only a TRAINING model can fail"):
        wh.mark_model_failed(conn, second.id, "late failure")
    third = _start(conn, paris, "job-3")
    assert wh.ready_model(conn, paris.id) == ready  # the newest READY, not the training one
    wh.mark_model_ready(conn, third.id, registry_version=8, model_uri="s3://models/sights-paris/8.onnx")
    newest = wh.ready_model(conn, paris.id)
    assert newest is not None and newest.version == 3
    assert [m.version for m in wh.list_models(conn, paris.id)] == [3, 2, 1]
    assert wh.model_for_job(conn, "job-2") == ready
    assert wh.model_for_job(conn, "job-404") is None
    assert wh.next_model_version(conn, paris.id) == 4


def test_model_mistakes_are_user_errors(conn: psycopg.Connection[Any]) -> None:
    paris = wh.create_city(conn, "Paris")
    model = _start(conn, paris, "job-1")
    wh.mark_model_failed(conn, model.id, "x")
    with pytest.raises(UserError, match="recorded already"):
        _start(conn, paris, "job-1")
    with pytest.raises(UserError, match="no city with id"):
        wh.start_model(conn, 999, training_job_id="j", dataset="d", classes=[], images=0, registry_name="r")
    with pytest.raises(UserError, match="no sight model with id"):
        wh.mark_model_ready(conn, 999, registry_version=1, model_uri="u")


def test_a_failed_start_inside_a_transaction_leaves_it_usable(conn: psycopg.Connection[Any]) -> None:
    paris = wh.create_city(conn, "Paris")
    _start(conn, paris, "job-1")
    with conn.transaction():
        with pytest.raises(UserError):
            _start(conn, paris, "job-2")
        assert wh.training_model(conn, paris.id) is not None  # the transaction goes on


# --- marts --------------------------------------------------------------------------------------------------


def test_marts_show_what_the_last_refresh_saw(conn: psycopg.Connection[Any]) -> None:
    paris = wh.create_city(conn, "Paris")
    tower, _ = wh.add_sight(conn, paris.id, "Eiffel Tower")
    wh.add_sight(conn, paris.id, "Arc de Triomphe")
    for n in range(3):
        _image(conn, paris, n, sight_id=tower.id)
    assert wh.city_mart_row(conn, paris.id) is None
    wh.refresh_marts(conn)
    row = wh.city_mart_row(conn, paris.id)
    assert row is not None
    assert (row.name, row.slug, row.sights, row.images, row.unlabelled_images, row.labelled_images) == (
        "Paris", "paris", 2, 3, 3, 0,
    )  # fmt: skip
    assert (row.labels, row.model_version, row.training, row.last_labelled_at) == (0, None, False, None)
    _start(conn, paris, "job-1")
    assert wh.city_mart_row(conn, paris.id) == row  # not refreshed yet
    wh.refresh_marts(conn)
    row = wh.city_mart_row(conn, paris.id)
    assert row is not None and row.training
    labels = wh.label_mart(conn, paris.id)
    assert [(s.name, s.training_images, s.training_labels, s.held_out_images) for s in labels] == [
        ("Arc de Triomphe", 0, 0, 0),
        ("Eiffel Tower", 0, 0, 0),
    ]
    rome = wh.create_city(conn, "Rome")
    wh.refresh_marts(conn)
    page = wh.city_mart(conn, limit=1)
    assert [c.city_id for c in page.items] == [paris.id] and page.next_after == paris.id
    rest = wh.city_mart(conn, limit=1, after=page.next_after)
    assert [c.city_id for c in rest.items] == [rome.id] and rest.next_after is None


def test_a_reader_holding_the_mart_does_not_block_a_refresh(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    wh.create_city(conn, "Paris")
    wh.refresh_marts(conn)
    with connect(database_url, autocommit=False) as reader:
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        before = reader.execute("SELECT count(*) FROM sight_city_mart").fetchone()
        assert before == (1,)
        # The reader's transaction is open (its lock on the mart held) while another refreshes.
        with connect(database_url) as refresher:
            refresher.execute("SET lock_timeout = '3s'")
            wh.create_city(refresher, "Rome")
            wh.refresh_marts(refresher)
        assert reader.execute("SELECT count(*) FROM sight_city_mart").fetchone() == (1,)  # its snapshot
        reader.rollback()
        assert reader.execute("SELECT count(*) FROM sight_city_mart").fetchone() == (2,)
        reader.rollback()


def test_a_refresh_in_progress_does_not_block_readers(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    wh.create_city(conn, "Paris")
    wh.refresh_marts(conn)
    wh.create_city(conn, "Rome")
    with connect(database_url, autocommit=False) as refresher:
        wh.refresh_marts(refresher)  # done, not committed: it holds its lock on both marts
        with connect(database_url) as reader:
            reader.execute("SET lock_timeout = '2s'")
            reader.execute("SET statement_timeout = '5s'")
            assert [c.name for c in wh.city_mart(reader).items] == ["Paris"]  # the old rows, at once
            assert wh.label_mart(reader, 1) == []
            refresher.commit()
            assert [c.name for c in wh.city_mart(reader).items] == ["Paris", "Rome"]
