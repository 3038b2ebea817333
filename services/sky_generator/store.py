"""Where a sky job's files go: ``<output>/<job_id>/...`` under an ``s3://`` prefix or a local directory.

Every name is fixed by the job and the frame (``frames/<job_id>-000042.png``, ``parts/shard-00003.jsonl``),
so a shard rendered twice overwrites its own objects: there are never two copies of a frame.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from services.cloud import objects


class JobStore:
    """The files of one job, under ``output`` (``s3://bucket/prefix`` or a directory) and its id."""

    def __init__(self, output: str, job_id: str, *, s3_client: Any = None) -> None:
        self.job_id = job_id
        self.s3 = output.startswith("s3://")
        if self.s3:
            bucket, prefix = objects.split_s3_url(output.rstrip("/") + "/")
            self.bucket, self.prefix = bucket, objects.join_key(prefix, job_id)
            self._client = s3_client
        else:
            self.root = Path(output) / job_id

    @property
    def client(self) -> Any:
        """The S3 client (made when first needed)."""
        if self._client is None:
            self._client = objects.s3_client()
        return self._client

    def uri(self, name: str) -> str:
        """Where ``name`` (relative to the job) lives."""
        return (
            f"s3://{self.bucket}/{objects.join_key(self.prefix, name)}" if self.s3 else str(self.root / name)
        )

    def put_file(self, name: str, path: Path, content_type: str) -> None:
        """Store the file at ``path`` as ``name`` (replacing it)."""
        if self.s3:
            self.client.upload_file(
                str(path),
                self.bucket,
                objects.join_key(self.prefix, name),
                ExtraArgs={"ContentType": content_type},
            )
            return
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(path, partial)
        partial.replace(target)

    def put_text(self, name: str, text: str, content_type: str = "application/x-ndjson") -> None:
        """Store ``text`` as ``name`` (replacing it), whole."""
        if self.s3:
            objects.write_object(self.uri(name), text.encode(), content_type=content_type, client=self.client)
            return
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(text)
        partial.replace(target)

    def texts(self, folder: str) -> list[str]:
        """The texts of every object under ``folder`` (the manifest parts), by name."""
        if not self.s3:
            return [p.read_text() for p in sorted((self.root / folder).glob("*.jsonl"))]
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=self.bucket, Prefix=objects.join_key(self.prefix, folder) + "/"
        ):
            keys += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(".jsonl")]
        return [
            objects.read_object(f"s3://{self.bucket}/{key}", self.client).decode() for key in sorted(keys)
        ]
