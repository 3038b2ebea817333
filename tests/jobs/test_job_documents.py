"""The shared document checks: every problem listed with its JSON path, job ids, schema, unknown fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from services.errors import UserError
from services.jobs.documents import DocumentChecker, is_int, job_id_of, kind, load_document

SCHEMA = "tessera.example/v1"
FIELDS = ("schema", "job_id", "name", "options")


def check(data: Mapping[str, Any]) -> str:
    checker = DocumentChecker("the example")
    job_id = checker.header(data, fields=FIELDS, schema=SCHEMA, reader="this example")
    checker.name("$.name", data.get("name"))
    options = data.get("options", {})
    if isinstance(options, Mapping):
        checker.unknown_fields("$.options", options, ("depth",))
    checker.done()
    return job_id


def test_a_good_document_passes_and_gets_a_job_id_when_it_names_none() -> None:
    assert check({"job_id": "run-1", "name": "ships"}) == "run-1"
    fresh = check({"name": "ships"})
    assert len(fresh) == 32 and fresh != check({"name": "ships"})


def test_every_problem_is_listed_with_its_json_path() -> None:
    with pytest.raises(UserError) as caught:
        check(
            {
                "schema": "tessera.example/v0",
                "job_id": "../etc",
                "name": 7,
                "colour": "red",
                "options": {"depth": 1, "width": 2},
            }
        )
    text = str(caught.value)
    assert text.startswith("the example has 5 problems:")
    assert "$.colour: unknown field; the fields are schema, job_id, name, options" in text
    assert (
        "$.schema: unsupported schema 'tessera.example/v0'; this example reads 'tessera.example/v1'" in text
    )
    assert "$.job_id: must be 1-128 letters" in text and "got the string '../etc'" in text
    assert "$.name: must be 1-128 letters" in text and "got the number 7" in text
    assert "$.options.width: unknown field; the only field is depth" in text


def test_one_problem_reads_in_the_singular() -> None:
    with pytest.raises(UserError, match=r"^the example has a problem:\n  \$\.name: "):
        check({"name": None})


def test_documents_that_are_not_json_objects_are_refused_with_what_they_are() -> None:
    with pytest.raises(UserError, match="the example is not JSON"):
        load_document("{broken", "the example")
    with pytest.raises(UserError, match=r"\$: the example must be a JSON object, got a list"):
        load_document("[1, 2]", "the example")
    assert load_document(b'{"a": 1}', "the example") == {"a": 1}


def test_job_id_of_reads_a_usable_id_even_from_an_invalid_document() -> None:
    assert job_id_of(json.dumps({"job_id": "j-1", "image": 3})) == "j-1"
    assert job_id_of({"job_id": "j-2"}) == "j-2"
    assert job_id_of("{broken") is None
    assert job_id_of(json.dumps({"job_id": "../x"})) is None
    assert job_id_of("[]") is None


def test_values_are_named_as_a_user_wrote_them() -> None:
    values: tuple[Any, ...] = (None, True, 3, 2.5, "x", [], {})
    assert [kind(v) for v in values] == [
        "null",
        "a boolean",
        "the number 3",
        "the number 2.5",
        "the string 'x'",
        "a list",
        "an object",
    ]
    assert is_int(3) and not is_int(True) and not is_int(3.0)


def test_a_bad_s3_url_names_the_part_to_fix() -> None:
    from services.jobs.documents import s3_url_problem

    assert s3_url_problem("s3://models/ships") is None
    assert s3_url_problem("s3://x/y") == (
        "'s3://x/y': the bucket name 'x' is not a valid S3 bucket name (3-63 lowercase letters, digits, "
        "'.' or '-', starting with a letter or digit)"
    )
    assert s3_url_problem("s3:///ships") == "'s3:///ships' names no bucket; write s3://BUCKET/PREFIX"
    assert "bucket name 'My_Bucket'" in str(s3_url_problem("s3://My_Bucket/x"))
