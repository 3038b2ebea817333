"""Versioned JSON documents (image requests, training jobs) checked field by field, every problem reported.

A service describes its document with a :class:`DocumentChecker` subclass: it reads fields, calls
:meth:`DocumentChecker.problem` with the JSON path of each bad one, and finally :meth:`DocumentChecker.done`
raises one :class:`~services.errors.UserError` listing them all (``$.merge.iou: must be a number 0..1``), so
a client fixes a document in one round trip. The pieces every document has (``schema``, ``job_id``, unknown
fields, names, S3 URLs) are checked here the same way for every service, and so are the trust rules of
:mod:`~services.jobs.trust` (where a request may read, write and connect): :meth:`DocumentChecker.trusted`
applies one and files its refusal under the field's JSON path.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from services.errors import UserError
from services.jobs.trust import TrustError, TrustPolicy

#: Job ids and names (safe in S3 keys and paths).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
#: ``s3://BUCKET`` or ``s3://BUCKET/PREFIX``.
S3_URL_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?$")
_BUCKET_RULE = "3-63 lowercase letters, digits, '.' or '-', starting with a letter or digit"


def s3_url_problem(value: str) -> str | None:
    """What is wrong with an ``s3://`` URL, naming the part (None when :data:`S3_URL_PATTERN` takes it)."""
    if S3_URL_PATTERN.match(value):
        return None
    if value[:5].lower() != "s3://":
        return f"{value!r} is not an s3:// URL; write s3://BUCKET/PREFIX"
    bucket = value[5:].split("/", 1)[0]
    if not bucket:
        return f"{value!r} names no bucket; write s3://BUCKET/PREFIX"
    return f"{value!r}: the bucket name {bucket!r} is not a valid S3 bucket name ({_BUCKET_RULE})"


def new_job_id() -> str:
    """A fresh job id."""
    return uuid.uuid4().hex


def kind(value: Any) -> str:
    """How a JSON value reads in an error message: ``null``, ``the number 3``, ``the string 'x'``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    return "an object"


def is_int(value: Any) -> bool:
    """Whether a JSON value is a whole number (``true`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def load_document(data: str | bytes | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    """``data`` as a JSON object (text is parsed); UserError naming ``what`` (e.g. "the image request") when
    it is not JSON or not an object."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"$: {what} must be a JSON object, got {kind(data)}")
    return data


def job_id_of(data: str | bytes | Mapping[str, Any]) -> str | None:
    """The job id a possibly invalid document names, if it names a usable one (to record its failure)."""
    try:
        document = load_document(data, "the document")
    except UserError:
        return None
    job_id = document.get("job_id")
    return job_id if isinstance(job_id, str) and NAME_PATTERN.match(job_id) else None


class DocumentChecker:
    """Collects every problem of one document (``what``, e.g. "the image request"), then raises them all."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        """Record that the value at JSON path ``path`` is wrong, and how to put it right."""
        self.problems.append(f"{path}: {message}")

    def unknown_fields(self, path: str, value: Mapping[str, Any], known: Iterable[str]) -> None:
        """A problem for every key of the object at ``path`` that is not one of ``known``."""
        names = tuple(known)
        for key in value:
            if key not in names:
                if len(names) == 1:
                    self.problem(f"{path}.{key}", f"unknown field; the only field is {names[0]}")
                else:
                    self.problem(f"{path}.{key}", f"unknown field; the fields are {', '.join(names)}")

    def header(self, data: Mapping[str, Any], *, fields: Iterable[str], schema: str, reader: str) -> str:
        """Check the top level's field names, ``schema`` (``reader`` names who reads it, e.g. "this trainer")
        and ``job_id``; returns the job id (a fresh one when the document names none)."""
        self.unknown_fields("$", data, fields)
        given = data.get("schema", schema)
        if given != schema:
            self.problem("$.schema", f"unsupported schema {given!r}; {reader} reads {schema!r}")
        job_id = data.get("job_id")
        if job_id is None:
            return new_job_id()
        if not isinstance(job_id, str) or not NAME_PATTERN.match(job_id):
            self.problem("$.job_id", f"must be {NAME_RULE}; got {kind(job_id)}")
            return ""
        return job_id

    def name(self, path: str, value: Any) -> str | None:
        """``value`` when it is a usable name (:data:`NAME_PATTERN`), else a problem and None."""
        if isinstance(value, str) and NAME_PATTERN.match(value):
            return value
        self.problem(path, f"must be {NAME_RULE}; got {kind(value)}")
        return None

    def trusted(
        self, path: str, check: Callable[..., str], value: str, policy: TrustPolicy, **options: Any
    ) -> str | None:
        """``check(value, policy, **options)`` (a :mod:`~services.jobs.trust` rule): the value to use, or
        None with the refusal recorded as the problem of ``path``."""
        try:
            return check(value, policy, **options)
        except TrustError as refusal:
            self.problem(path, str(refusal))
            return None

    def done(self) -> None:
        """Raise one UserError listing every problem found, if any."""
        if self.problems:
            count = f"{len(self.problems)} problems" if len(self.problems) > 1 else "a problem"
            raise UserError(f"{self.what} has {count}:\n  " + "\n  ".join(self.problems))
