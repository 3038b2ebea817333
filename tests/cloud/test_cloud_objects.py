"""S3 edges on moto: URLs, reads, writes, uploads and what a missing object says."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cloud.embedded import Resources
from services.cloud.objects import join_key, object_etag, read_object, split_s3_url, upload_file, write_object
from services.errors import UserError


def test_split_and_join() -> None:
    assert split_s3_url("s3://bucket/a/b.tif") == ("bucket", "a/b.tif")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    assert join_key("results/", "job.geojson") == "results/job.geojson"
    assert join_key("", "job.geojson") == "job.geojson"
    with pytest.raises(UserError, match="s3://BUCKET/KEY"):
        split_s3_url("/local/path.tif")


def test_write_read_upload_and_versions(resources: Resources, tmp_path: Path) -> None:
    bucket = resources.buckets["models"]
    write_object(f"s3://{bucket}/m/a.bin", b"one")
    assert read_object(f"s3://{bucket}/m/a.bin") == b"one"
    first = object_etag(f"s3://{bucket}/m/a.bin")
    local = tmp_path / "b.bin"
    local.write_bytes(b"two" * 1000)
    upload_file(local, f"s3://{bucket}/m/a.bin")
    assert read_object(f"s3://{bucket}/m/a.bin") == b"two" * 1000
    assert object_etag(f"s3://{bucket}/m/a.bin") != first


def test_missing_objects_and_buckets_are_user_errors(resources: Resources) -> None:
    bucket = resources.buckets["models"]
    with pytest.raises(UserError, match=f"s3://{bucket}/nope.onnx does not exist"):
        read_object(f"s3://{bucket}/nope.onnx")
    with pytest.raises(UserError, match="does not exist"):
        object_etag(f"s3://{bucket}/nope.onnx")
    with pytest.raises(UserError, match="bucket"):
        read_object("s3://no-such-bucket-here/x.onnx")
