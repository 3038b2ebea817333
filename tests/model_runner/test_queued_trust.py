"""Queued requests are confined (moto SQS + S3, real PostgreSQL): a request that reaches for a URL, a local
file or a key outside the deployment's buckets and roots is FAILED with the field and the reason, nothing
is read or written for it, and the worker goes on to run the next, good request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from runner_harness import Crew, job_done, job_status, request_for, submit, upload_scene, wait_until

from services.cloud.embedded import Resources


@pytest.fixture
def listener() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server that records every path asked of it (what an SSRF would reach)."""
    hits: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hits
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("runner_env")
def test_hostile_requests_fail_and_the_worker_serves_the_next(
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
    listener: tuple[int, list[str]],
) -> None:
    port, hits = listener
    scene = upload_scene(resources, tmp_path, square_model)
    victim = tmp_path / "victim.geojson"
    victim.write_text("precious")
    results = resources.buckets["results"]
    hostile: dict[str, tuple[dict[str, Any], str]] = {
        "ssrf-vsicurl": (
            {"image": f"/vsicurl?url=http%3A%2F%2F127.0.0.1%3A{port}%2Fx.tif"},
            "$.image: the image '/vsicurl",
        ),
        "ssrf-endpoint": (
            {"model": None, "endpoint": {"url": f"http://127.0.0.1:{port}/invocations", "tile_size": 64}},
            "$.endpoint.url:",
        ),
        "local-image": ({"image": "/etc/passwd"}, "may not read local files"),
        "overwrite-file": ({"outputs": {"path": str(victim)}}, "$.outputs.path: queued requests may not"),
        "new-directory": (
            {"outputs": {"path": str(tmp_path / "made" / "x.geojson")}},
            "$.outputs.path:",
        ),
        "key-traversal": ({"outputs": {"s3": f"s3://{results}/../../etc"}}, "$.outputs.s3:"),
        "foreign-bucket": ({"model": "s3://someone-elses-models/m.onnx"}, "TESSERA_ALLOWED_BUCKETS"),
    }
    for job_id, (changes, _) in hostile.items():
        body = request_for(scene, job_id)
        for key, value in changes.items():
            if value is None:
                body.pop(key)
            else:
                body[key] = value
        submit(resources, body)
    submit(resources, request_for(scene, "good-after-hostile"))

    with Crew(count=1):
        wait_until(job_done(database_url, "good-after-hostile"), 60, "the good job after the hostile ones")

    for job_id, (_, says) in hostile.items():
        job = job_status(database_url, job_id)
        assert job is not None and job.status == "FAILED", (job_id, job)
        assert job.reason is not None and says in job.reason, (job_id, job.reason)
    good = job_status(database_url, "good-after-hostile")
    assert good is not None and good.status == "SUCCESS", good
    assert good.output_uris == [f"{scene.results_prefix}/good-after-hostile.geojson"]
    # Nothing was reached, overwritten or created for the refused requests.
    assert hits == []
    assert victim.read_text() == "precious"
    assert not (tmp_path / "made").exists()
