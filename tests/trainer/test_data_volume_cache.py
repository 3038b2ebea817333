"""The training box's data volume caches what lives in S3: datasets are staged there once and reused by the
next job (downloaded again only when an object changed), and a resume reads the checkpoint kept there when
it still matches S3."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from trainer_toy import ToyTask

from services.errors import UserError
from services.trainer import storage
from services.trainer.device import Device
from services.trainer.job import parse_job
from services.trainer.loop import run
from services.trainer.storage import CachedStorage, fetch_dataset, storage_for

CPU = Device("cpu", torch.device("cpu"))
BUCKET = "tessera-datasets"


class CountingS3:
    """A boto3 S3 client that counts what it fetches: object downloads and GETs, by key."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.downloads: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def download_file(self, bucket: str, key: str, filename: str, **kwargs: Any) -> None:
        self.downloads[key] += 1
        self._client.download_file(bucket, key, filename, **kwargs)

    def get_object(self, **kwargs: Any) -> Any:
        self.gets[kwargs["Key"]] += 1
        return self._client.get_object(**kwargs)


@pytest.fixture
def s3(mocked_aws: boto3.Session) -> CountingS3:
    client = mocked_aws.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return CountingS3(client)


@pytest.fixture
def data_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A training box's environment: TESSERA_DATA_DIR set (as its start script sets it), no cache override."""
    volume = tmp_path / "data"
    volume.mkdir()
    monkeypatch.setenv("TESSERA_DATA_DIR", str(volume))
    monkeypatch.delenv("TESSERA_TRAINER_CACHE", raising=False)
    return volume


def _upload(s3: CountingS3, files: dict[str, bytes], prefix: str = "ships") -> None:
    for name, body in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)


def test_a_staged_dataset_lands_on_the_data_volume_and_the_next_job_reuses_it(
    s3: CountingS3, data_volume: Path
) -> None:
    files = {"a.tif": b"a" * 100, "labels/a.json": b"{}", "b.tif": b"b" * 50}
    _upload(s3, files)

    first = fetch_dataset(f"s3://{BUCKET}/ships/", client=s3)  # the first job stages it
    assert first == data_volume / "datasets" / BUCKET / "ships"
    assert {p.relative_to(first).as_posix(): p.read_bytes() for p in first.rglob("*") if p.is_file()} == files
    assert sum(s3.downloads.values()) == 3

    again = fetch_dataset(f"s3://{BUCKET}/ships", client=s3)  # the next job, same dataset
    assert again == first
    assert sum(s3.downloads.values()) == 3  # not one byte downloaded again


def test_a_changed_object_is_downloaded_again_and_a_removed_one_leaves_the_dataset(
    s3: CountingS3, data_volume: Path
) -> None:
    _upload(s3, {"a.tif": b"version-1", "b.tif": b"bbbb"})
    local = fetch_dataset(f"s3://{BUCKET}/ships/", client=s3)
    _upload(s3, {"a.tif": b"version-2"})  # same size, new content: only the ETag tells
    s3.delete_object(Bucket=BUCKET, Key="ships/b.tif")
    assert fetch_dataset(f"s3://{BUCKET}/ships/", client=s3) == local
    assert (local / "a.tif").read_bytes() == b"version-2"
    assert not (local / "b.tif").exists()
    assert s3.downloads == Counter({"ships/a.tif": 2, "ships/b.tif": 1})


def test_datasets_used_least_recently_make_room_for_the_next_one(
    s3: CountingS3, data_volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upload(s3, {"old.bin": b"o" * 400}, prefix="old")
    _upload(s3, {"new.bin": b"n" * 400}, prefix="new")
    old = fetch_dataset(f"s3://{BUCKET}/old/", client=s3)
    # A volume with 500 bytes of room (the margin aside): both datasets cannot stay.
    staged = lambda: sum(p.stat().st_size for p in data_volume.rglob("*.bin"))  # noqa: E731
    monkeypatch.setattr(storage, "FREE_MARGIN_BYTES", 0)
    monkeypatch.setattr(
        storage.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 500 - staged()})()
    )
    new = fetch_dataset(f"s3://{BUCKET}/new/", client=s3)
    assert (new / "new.bin").is_file()
    assert not (old / "old.bin").exists()
    # Too big even for an empty cache: the job fails saying what to change.
    _upload(s3, {"huge.bin": b"h" * 600}, prefix="huge")
    with pytest.raises(UserError, match="trainingDataVolumeGb"):
        fetch_dataset(f"s3://{BUCKET}/huge/", client=s3)


def test_a_checkpoint_written_to_s3_is_kept_on_the_volume_and_read_back_while_it_matches(
    s3: CountingS3, data_volume: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = storage_for(f"s3://{BUCKET}/runs/ships-1/", s3)
    assert isinstance(out, CachedStorage)
    written = tmp_path / "step-000000010.pt"
    written.write_bytes(b"checkpoint at step 10")
    out.put_file(written, "checkpoints/step-000000010.pt")
    written.unlink()  # the loop removes its local copy once S3 has it

    resumed = tmp_path / "resume-0.pt"
    assert out.get_file("checkpoints/step-000000010.pt", resumed)
    assert resumed.read_bytes() == b"checkpoint at step 10"
    assert s3.gets["runs/ships-1/checkpoints/step-000000010.pt"] == 0  # read from the volume
    assert str(out.cache_dir).startswith(str(data_volume / "checkpoints"))

    # S3 is the truth: a checkpoint replaced there is downloaded, not taken from the stale copy.
    s3.put_object(Bucket=BUCKET, Key="runs/ships-1/checkpoints/step-000000010.pt", Body=b"rewritten")
    assert out.get_file("checkpoints/step-000000010.pt", resumed)
    assert resumed.read_bytes() == b"rewritten"
    assert s3.gets["runs/ships-1/checkpoints/step-000000010.pt"] == 1
    assert not out.get_file("checkpoints/step-000000099.pt", resumed)

    # Only the latest checkpoint keeps a place on the disk.
    written.write_bytes(b"checkpoint at step 20")
    out.put_file(written, "checkpoints/step-000000020.pt")
    cached = sorted(p.name for p in (out.cache_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert cached == ["step-000000020.pt"]

    # Off a training box (no data volume) S3 is used alone.
    monkeypatch.delenv("TESSERA_DATA_DIR")
    assert not isinstance(storage_for(f"s3://{BUCKET}/runs/ships-1/", s3), CachedStorage)


def test_a_resumed_job_reads_its_checkpoint_from_the_volume(s3: CountingS3, data_volume: Path) -> None:
    job = parse_job(
        {
            "task": "toy",
            "dataset": "synthetic",
            "output": f"s3://{BUCKET}/runs/toy-1/",
            "job_id": "toy-1",
            "steps": 6,
            "checkpoint_every": 2,
        }
    )

    class StoppedError(RuntimeError):
        pass

    def stop_after_four(step: int, losses: object) -> None:
        if step == 4:
            raise StoppedError("the box is stopping")

    with pytest.raises(StoppedError):
        run(ToyTask(), job, CPU, storage_for(job.output, s3), on_step=stop_after_four)
    result = run(ToyTask(), job, CPU, storage_for(job.output, s3))
    assert result.resumed_from_step == 4
    assert result.steps == 6
    checkpoint_gets = {k: n for k, n in s3.gets.items() if k.endswith(".pt")}
    assert checkpoint_gets == {}  # resumed from the volume, not downloaded


def test_keys_and_prefixes_that_would_leave_the_cache_are_refused(s3: CountingS3, data_volume: Path) -> None:
    # Eviction deletes files under the cache: nothing a dataset URL or an object key says may point outside.
    outside = data_volume.parent / "escaped.txt"
    _upload(s3, {"good.tif": b"g", "../../../../escaped.txt": b"x", "nested/../alias.tif": b"y"})
    local = fetch_dataset(f"s3://{BUCKET}/ships/", client=s3)
    assert {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} == {"good.tif"}
    assert not outside.exists()
    with pytest.raises(UserError, match="outside the dataset cache"):
        fetch_dataset(f"s3://{BUCKET}/../../etc/", client=s3)
