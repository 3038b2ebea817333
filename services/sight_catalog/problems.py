"""The catalog API's errors: RFC 9457 problem details (``application/problem+json``), one type per way a
request can fail (:data:`PROBLEMS`), raised as :class:`Problem` and described in the OpenAPI document by
:data:`ERRORS`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

PROBLEM_TYPE = "application/problem+json"

#: Every error type: name -> (HTTP status, title, what it means).
PROBLEMS: dict[str, tuple[int, str, str]] = {
    "unauthorized": (
        401,
        "Missing or wrong token",
        "Send 'Authorization: Bearer <token>' with the server's token.",
    ),
    "unknown-city": (404, "No such city", "Request the city first (POST /api/cities), or check its slug."),
    "not-found": (404, "Not found", "The path names nothing here; see /openapi.json."),
    "method-not-allowed": (405, "Method not allowed", "The path exists; the Allow header lists its methods."),
    "invalid-request": (422, "Invalid request", "A parameter or the JSON body is malformed; see 'errors'."),
    "invalid-name": (400, "Invalid name", "A city or sight name is 1 to 100 characters of text."),
    "empty-upload": (400, "Empty upload", "The file holds no bytes; send a JPEG, PNG or WebP photo."),
    "bad-upload": (
        400,
        "Malformed upload",
        "Send multipart/form-data with one file part, or the photo's bytes.",
    ),
    "upload-too-large": (413, "Upload too large", "The photo is over the size limit; send a smaller one."),
    "unsupported-media-type": (415, "Not an image", "Only JPEG, PNG and WebP photos are accepted."),
    "unreadable-image": (422, "Unreadable image", "The file claims to be a photo but cannot be decoded."),
    "rate-limited": (429, "Too many requests", "Wait for Retry-After seconds before trying again."),
    "no-model": (409, "No model yet", "The city has no READY model; its status says what it has."),
    "model-unavailable": (503, "Model unavailable", "The city's model could not be opened; try again later."),
    "database-unavailable": (503, "Database unavailable", "The warehouse did not answer; try again later."),
    "storage-unavailable": (
        503,
        "Storage unavailable",
        "The datasets bucket could not be written; try again.",
    ),
    "busy": (503, "Busy", "Every slot is taken; try again after Retry-After seconds."),
    "internal-error": (
        500,
        "Internal error",
        "Something unexpected failed; the server's log has the details.",
    ),
}


class Problem(Exception):  # noqa: N818 - RFC 9457's name for it
    """An error answered as ``application/problem+json``; ``kind`` is a key of :data:`PROBLEMS`."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status, self.title, _ = PROBLEMS[kind]
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self, instance: str) -> JSONResponse:
        """The problem as a response to the request for ``instance``."""
        body = {
            "type": f"/problems/{self.kind}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extra,
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers, media_type=PROBLEM_TYPE)


class ProblemOut(BaseModel):
    """An error (RFC 9457 problem details)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemOut, "content": {PROBLEM_TYPE: {}}}
    for status in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}
