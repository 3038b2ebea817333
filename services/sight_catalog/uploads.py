"""Photos uploaded to the catalog API: read from a request's body within the size cap as it streams in (a
``multipart/form-data`` file part, or the photo's bytes), checked, and described for the OpenAPI document.
:mod:`services.sight_catalog.api` says what an upload may be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from services.sight_catalog.image_checks import IMAGE_SUFFIXES, sniff, what_it_is
from services.sight_catalog.problems import Problem
from services.sight_catalog.recognition import UnreadableImageError, check_photo

#: Room for a multipart body's boundaries, part headers and small fields beyond the photo itself.
MULTIPART_OVERHEAD = 64 * 1024
#: Largest text field of a multipart upload.
MAX_FIELD_BYTES = 4096


@dataclass
class Upload:
    """A photo read from a request body: its bytes, the file name the client gave, and text fields."""

    data: bytes
    filename: str
    fields: dict[str, str]


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The photo in ``request``'s body (see the module docstring), never holding more than ``max_bytes`` of
    it; :class:`Problem` for a body over the limit, malformed, or of another media type."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length")
    too_large = Problem(
        "upload-too-large",
        f"the photo is over the limit of {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB); send a smaller one",
        limit_bytes=max_bytes,
    )
    allowance = max_bytes + (MULTIPART_OVERHEAD if media_type == "multipart/form-data" else 0)
    if declared is not None:
        if not declared.isdigit():
            raise Problem("bad-upload", f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > allowance:
            raise too_large
    if media_type in IMAGE_SUFFIXES.values() or media_type == "application/octet-stream":
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        return Upload(bytes(body), "", {})
    if media_type != "multipart/form-data":
        raise Problem(
            "unsupported-media-type",
            "a photo comes as multipart/form-data (a file part) or as image/jpeg, image/png or image/webp, "
            f"not {media_type or 'a body without a Content-Type'}",
        )
    return await _multipart(request, content_type, max_bytes, too_large)


async def _multipart(request: Request, content_type: str, max_bytes: int, too_large: Problem) -> Upload:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem("bad-upload", "the multipart Content-Type names no boundary")
    state: dict[str, Any] = {"name": "", "filename": None, "disposition": b"", "header": b"", "value": b""}
    files: list[tuple[str, bytearray]] = []
    fields: dict[str, str] = {}
    current = bytearray()
    errors: list[Problem] = []

    def on_part_begin() -> None:
        state.update(name="", filename=None, disposition=b"")
        current.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["header"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state["disposition"])
        state["name"] = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        state["filename"] = None if filename is None else filename.decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.extend(data[start:end])
        limit = max_bytes if state["filename"] is not None else MAX_FIELD_BYTES
        if len(current) > limit:
            errors.append(
                too_large
                if state["filename"] is not None
                else Problem("bad-upload", f"the field {state['name']!r} is over {MAX_FIELD_BYTES} bytes")
            )
            raise _StopParsingError

    def on_part_end() -> None:
        if state["filename"] is not None:
            if files:
                errors.append(Problem("bad-upload", "send one photo per request, not several files"))
                raise _StopParsingError
            files.append((state["filename"], bytearray(current)))
        elif state["name"]:
            fields[state["name"]] = current.decode("utf-8", "replace")
        current.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + MULTIPART_OVERHEAD:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except _StopParsingError:
        raise errors[0] from None
    except FormParserError as exc:
        raise Problem("bad-upload", f"the multipart body is malformed: {exc}") from None
    if not files:
        raise Problem("bad-upload", "the multipart body holds no file part: attach the photo as a file")
    filename, data = files[0]
    return Upload(bytes(data), filename, fields)


class _StopParsingError(Exception):
    """Stops the multipart parser (the reason is kept aside)."""


def upload_body(what: str) -> dict[str, Any]:
    """The OpenAPI description of an upload's body (read from the stream, not declared as parameters)."""
    return {
        "requestBody": {
            "required": True,
            "description": what,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "sight": {"type": "string"},
                        },
                    }
                },
                **{
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in ("image/jpeg", "image/png", "image/webp")
                },
            },
        }
    }


def check_upload(data: bytes, max_pixels: int) -> None:
    """Problem unless ``data`` is a photo this reads: empty 400, not an image 415, undecodable 422."""
    if not data:
        raise Problem("empty-upload", "the file is empty (0 bytes): send a JPEG, PNG or WebP photo")
    if sniff(data) is None:
        raise Problem(
            "unsupported-media-type",
            f"the file is not a JPEG, PNG or WebP photo ({what_it_is(data)}, {len(data)} bytes)",
        )
    try:
        check_photo(data, max_pixels=max_pixels)
    except UnreadableImageError as exc:
        raise Problem("unreadable-image", str(exc)) from None
