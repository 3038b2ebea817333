"""Where annotated copies of frames go: a local folder or an ``s3://`` prefix (the results bucket's fits/).

A copy is named ``<first 12 hex of the original's SHA-256>-<original file name>``: two frames of the same
name from different nights never overwrite each other, the same frame judged twice overwrites its own copy,
and the name holds no colon or path of the original.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from services.cloud import objects
from services.errors import UserError
from services.fits_classifier.annotate import annotated_copy
from services.fits_classifier.verdicts import Verdict

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def copy_name(verdict: Verdict) -> str:
    """The annotated copy's file name (see the module docstring)."""
    base = verdict.source.rstrip("/").rsplit("/", 1)[-1] or "frame.fits"
    return f"{verdict.checksum[:12]}-{_UNSAFE.sub('_', base)[-150:]}"


class AnnotatedStore:
    """Writes annotated copies under ``target`` (a folder, made when missing, or ``s3://bucket/prefix``)."""

    def __init__(self, target: str, *, s3_client: Any = None) -> None:
        self.target = target
        self.s3 = target.startswith("s3://")
        self._client = s3_client
        if self.s3:
            self.bucket, self.prefix = objects.split_s3_url(target.rstrip("/") + "/")
        else:
            self.root = Path(target)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(
                    f"cannot write annotated frames to {target}: {error.strerror or error}"
                ) from None

    def put(self, verdict: Verdict, raw: bytes) -> str:
        """Write ``raw`` annotated with ``verdict``; where it went."""
        body = annotated_copy(raw, verdict)
        name = copy_name(verdict)
        if self.s3:
            if self._client is None:
                self._client = objects.s3_client()
            key = objects.join_key(self.prefix, name)
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/fits")
            return f"s3://{self.bucket}/{key}"
        path = self.root / name
        partial = path.with_name(f".{name}.partial")
        partial.write_bytes(body)
        partial.replace(path)  # whole or not at all
        return str(path)
