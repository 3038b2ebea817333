"""Where a job's GeoJSON goes, checked before the work and written whole after it.

:func:`check_outputs` runs before any detection work: a local output must land in a writable directory
(or one that can be made), an ``s3://`` output needs AWS credentials and a bucket that exists, so a run of an
hour does not end in "no credentials". :func:`write_outputs` writes the collection once, to a temporary
file, uploads it and renames it into place: a reader never sees a truncated file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from services.cloud import objects
from services.errors import UserError
from services.geo.features import FeatureWriter, NonFiniteError
from services.inference.detections import Detections
from services.model_runner.request import ImageRequest, Outputs
from services.tiling.reader import RasterSource

#: What a local output may be called: it holds GeoJSON.
OUTPUT_SUFFIXES = (".geojson", ".json")


def check_outputs(outputs: Outputs, job_id: str, *, image: str | None = None, s3_client: Any = None) -> None:
    """Refuse, before any work, outputs that cannot or must not be written: a local path not named
    ``.geojson``/``.json``, the input ``image`` itself, a directory, or one whose nearest existing parent is
    not a writable directory; an ``s3://`` prefix with no AWS credentials here, a bucket that does not
    exist, or an S3 that cannot be reached. (A bucket whose existence this identity may not ask about
    passes: the write itself says more.)"""
    if outputs.path:
        path = Path(outputs.path)
        if path.is_dir():
            raise UserError(f"the output {path} is a directory; give the path of the .geojson file to write")
        if path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise UserError(
                f"the output {path} would hold GeoJSON under another name; give a path ending in .geojson"
            )
        if image is not None and path.exists() and Path(image).exists() and path.samefile(image):
            raise UserError(f"the output {path} is the input image; give another path")
        _check_local(path)
    if outputs.s3:
        _check_s3(output_uris(Outputs(s3=outputs.s3), job_id)[0], s3_client)


def _check_local(path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write the output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output {path}: {parent} is not writable by this user")


def _check_s3(uri: str, s3_client: Any) -> None:
    bucket, _ = objects.split_s3_url(uri)
    if s3_client is None and boto3.Session().get_credentials() is None:
        raise UserError(
            f"no AWS credentials to write the output {uri}: {objects.CREDENTIALS_HELP}; or write a local path"
        )
    client = s3_client or objects.s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise UserError(
            f"no AWS credentials to write the output {uri}; set AWS_PROFILE or the keys"
        ) from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise UserError(f"cannot write the output {uri}: bucket {bucket} does not exist") from None
        if code not in ("403", "AccessDenied"):  # 403: may not ask, which says nothing about writing
            raise UserError(f"cannot write the output {uri}: S3 says {code or error}") from None
    except BotoCoreError as error:  # no endpoint, no network
        raise UserError(f"cannot write the output {uri}: S3 cannot be reached ({error})") from None


def output_uris(outputs: Outputs, job_id: str) -> list[str]:
    """Where a job's GeoJSON goes: ``<s3 prefix>/<job_id>.geojson`` and/or the local path."""
    uris = []
    if outputs.s3:
        bucket, prefix = objects.split_s3_url(outputs.s3.rstrip("/") + "/")
        uris.append(f"s3://{bucket}/{objects.join_key(prefix, f'{job_id}.geojson')}")
    if outputs.path:
        uris.append(str(Path(outputs.path)))
    return uris


def write_geojson(
    stream: BinaryIO,
    detections: Detections,
    source: RasterSource,
    *,
    class_names: Sequence[str],
    model: str,
    job_id: str,
    properties: dict[str, Any] | None = None,
) -> int:
    """Stream ``detections`` (image pixels) as a GeoJSON FeatureCollection; returns the feature count."""
    with FeatureWriter(
        stream,
        transform=source.transform,
        crs=source.crs,
        class_names=list(class_names),
        model=model,
        job=job_id,
        properties=properties,
    ) as writer:
        writer.write_detections(detections)
        return writer.count


def write_outputs(
    detections: Detections,
    source: RasterSource,
    request: ImageRequest,
    *,
    class_names: Sequence[str],
    s3_client: Any = None,
) -> list[str]:
    """Write the job's GeoJSON to every output the request names; returns their URIs.

    The collection is written once, to a temporary file (beside ``outputs.path`` when there is one, so the
    last step is a rename on one filesystem), flushed to disk, uploaded to ``outputs.s3`` (the upload has
    completed when this returns) and then renamed onto ``outputs.path``: a reader of the path sees the old
    file or the whole new one, never a truncated one. On any failure the temporary file is removed and
    nothing is left at the path; a disk or write error, or an S3 error the request's author must fix, is a
    UserError.
    """
    uris = output_uris(request.outputs, request.job_id)
    if not uris:
        return []
    local = Path(request.outputs.path) if request.outputs.path else None
    current = str(local) if local is not None else uris[0]  # what a failure names
    temporary: str | None = None
    try:
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{local.name}." if local is not None else f"{request.job_id}.",
            suffix=".partial",
            dir=local.parent if local is not None else None,
        )
        with os.fdopen(descriptor, "wb") as stream:
            # mkstemp makes the file private (0600); the output gets the mode a plain open() would give.
            os.fchmod(stream.fileno(), 0o666 & ~_umask())
            write_geojson(
                stream,
                detections,
                source,
                class_names=class_names,
                model=request.model_name,
                job_id=request.job_id,
                properties=dict(request.properties),
            )
            stream.flush()
            os.fsync(stream.fileno())
        for uri in uris:
            current = uri
            if uri.startswith("s3://"):
                _upload(temporary, uri, s3_client)
        if local is not None:
            current = str(local)
            os.replace(temporary, local)
            temporary = None
            _sync_directory(local.parent)
    except OSError as error:
        raise UserError(f"cannot write the output {current}: {error.strerror or error}") from None
    except NonFiniteError as error:
        raise UserError(f"cannot write the output {current}: {error}") from None
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
    return uris


def _upload(path: str, uri: str, s3_client: Any) -> None:
    """Upload the file at ``path`` to ``uri`` (returns once S3 has the whole object)."""
    bucket, key = objects.split_s3_url(uri)
    client = s3_client or objects.s3_client()
    try:
        # From the path, not a file object: boto3 closes a file object it is handed.
        client.upload_file(path, bucket, key, ExtraArgs={"ContentType": "application/geo+json"})
    except (ClientError, S3UploadFailedError) as error:
        code = _s3_error_code(error)
        if code in _USER_S3_ERRORS:
            raise UserError(f"cannot write the output {uri}: {code}; check outputs.s3") from None
        raise


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform can open a directory)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


#: S3 errors on writing the output that the request's author must fix (everything else is retried).
_USER_S3_ERRORS = ("NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidBucketName")


def _s3_error_code(error: BaseException) -> str:
    """The S3 error code of a failed write; boto3's transfer manager wraps the ClientError."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ClientError):
            return str(cause.response.get("Error", {}).get("Code", ""))
        cause = cause.__cause__ or cause.__context__
    return next((code for code in _USER_S3_ERRORS if code in str(error)), "")
