"""S3 objects: parse ``s3://`` URLs, read, write and upload, against AWS or the embedded moto server.

Clients honour ``AWS_ENDPOINT_URL`` (botocore reads it), which is how workers reach the embedded default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.exceptions import NoCredentialsError

from services.errors import UserError


def s3_client(endpoint_url: str | None = None) -> Any:
    """An S3 client; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) points it at a stand-in such as moto."""
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; a URL without a bucket raises UserError."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{url!r} is not an S3 URL; write it as s3://BUCKET/KEY")
    return parsed.netloc, parsed.path.lstrip("/")


def join_key(prefix: str, name: str) -> str:
    """A key under a prefix, with exactly one slash between them."""
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


#: What to do when no AWS credentials are found, said in every such error.
CREDENTIALS_HELP = (
    "set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or run where an instance role "
    "gives them"
)


def read_object(url: str, client: Any = None) -> bytes:
    """The whole object at ``url`` (meant for small objects: models, results; never imagery).

    A missing object or bucket raises UserError naming the URL.
    """
    bucket, key = split_s3_url(url)
    s3 = client or s3_client()
    try:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        raise UserError(f"{url} does not exist; upload it or fix the URL") from None
    except s3.exceptions.NoSuchBucket:
        raise UserError(f"the bucket of {url} does not exist; fix the URL") from None
    except NoCredentialsError:
        raise UserError(f"no AWS credentials to read {url}: {CREDENTIALS_HELP}") from None
    except s3.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise UserError(
                f"not allowed to read {url} ({code}); check the credentials and the URL"
            ) from None
        raise


def object_etag(url: str, client: Any = None) -> str:
    """The ETag of the object at ``url`` (a cheap version stamp for caches); UserError if it is missing."""
    bucket, key = split_s3_url(url)
    s3 = client or s3_client()
    try:
        return str(s3.head_object(Bucket=bucket, Key=key)["ETag"])
    except s3.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}:
            raise UserError(f"{url} does not exist; upload it or fix the URL") from None
        raise
    except NoCredentialsError:
        raise UserError(f"no AWS credentials to read {url}: {CREDENTIALS_HELP}") from None


def write_object(
    url: str, body: bytes, *, content_type: str = "application/octet-stream", client: Any = None
) -> None:
    """Write ``body`` to ``url``; the bucket's default encryption (SSE-KMS on the platform) applies."""
    bucket, key = split_s3_url(url)
    (client or s3_client()).put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)


def upload_file(
    path: str | Path, url: str, *, client: Any = None, extra: Mapping[str, str] | None = None
) -> None:
    """Upload a local file to ``url`` (multipart for large files, handled by boto3's transfer manager)."""
    bucket, key = split_s3_url(url)
    (client or s3_client()).upload_file(str(path), bucket, key, ExtraArgs=dict(extra or {}))
