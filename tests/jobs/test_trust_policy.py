"""The trust boundary: a queued request is confined to the deployment's buckets, roots and endpoints; every
refusal names the field's JSON path and what to write instead; ``tessera run`` keeps the user's own paths;
no document, however odd, crashes the checker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.errors import UserError
from services.jobs import trust
from services.jobs.queue_worker import QueueWorker
from services.jobs.trust import TrustError, TrustPolicy, confined, policy_in_force
from services.model_runner.request import SCHEMA, ImageRequest, parse_request
from services.registry import is_registry_ref

ENDPOINT = "http://detector.internal:8080/invocations"


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return Path(os.path.realpath(tmp_path / "in")), Path(os.path.realpath(tmp_path / "out"))


@pytest.fixture
def policy(roots: tuple[Path, Path]) -> TrustPolicy:
    """A queue policy: three buckets, a local root, an output root, one endpoint."""
    local_root, output_root = roots
    return TrustPolicy(
        confined=True,
        allowed_buckets=frozenset({"imagery", "models", "results"}),
        local_root=local_root,
        output_root=output_root,
        endpoint_urls=frozenset({ENDPOINT}),
    )


def good(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "job_id": "trust-1",
        "image": "s3://imagery/harbour.tif",
        "model": "s3://models/ships.onnx",
        "outputs": {"s3": "s3://results/harbour/"},
    }
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def refusal(data: dict[str, Any], policy: TrustPolicy, path: str) -> str:
    """The line of the UserError that names ``path``."""
    with pytest.raises(UserError) as caught:
        parse_request(data, policy)
    lines = [line.strip() for line in str(caught.value).splitlines()]
    line = next((line for line in lines if line.startswith(path + ":")), None)
    assert line is not None, str(caught.value)
    return line


HOSTILE = [
    # (what it tries, request changes, JSON path, what the message must say: the reason and the fix)
    ("SSRF through GDAL's curl", {"image": "/vsicurl?url=http%3A%2F%2F127.0.0.1%3A9%2Fx.tif"}, "$.image",
     "GDAL virtual path"),
    ("GDAL /vsis3 alias around the bucket check", {"image": "/vsis3/secrets/a.tif"}, "$.image",
     "give s3://BUCKET/KEY or a file path"),
    ("upper-case /VSICURL", {"image": "/VSICURL/http://169.254.169.254/latest"}, "$.image", "/vsi"),
    ("file:// outside the local root", {"image": "file:///etc/passwd"}, "$.image", "TESSERA_LOCAL_ROOT"),
    ("file:// on another host", {"image": "file://evil.example/a.tif"}, "$.image", "file:///ABSOLUTE/PATH"),
    ("absolute path outside the root", {"image": "/etc/shadow"}, "$.image", "give a path under"),
    ("'..' out of the local root", {"image": "scenes/../../../etc/passwd"}, "$.image", "'..' segment"),
    ("http image", {"image": "http://127.0.0.1:9/a.tif"}, "$.image", "s3:// URL"),
    ("bucket not allowed", {"image": "s3://someone-elses/a.tif"}, "$.image", "TESSERA_ALLOWED_BUCKETS"),
    ("'..' in an image key", {"image": "s3://imagery/../models/x.tif"}, "$.image", "without them"),
    ("'?' query trick in S3", {"image": "s3://imagery/a.tif?x=/../../secrets"}, "$.image", "plain key"),
    ("'#' fragment trick in S3", {"image": "s3://imagery/a.tif#/x"}, "$.image", "plain key"),
    ("percent-encoded traversal", {"image": "s3://imagery/a%2F..%2F..%2Fx"}, "$.image", "plain key"),
    ("NUL byte", {"image": "s3://imagery/a.tif\x00.png"}, "$.image", "control character"),
    ("very long key", {"image": "s3://imagery/" + "k" * 1100}, "$.image", "1024 bytes"),
    ("oversized text", {"image": "s3://imagery/" + "k" * 5000}, "$.image", "at most 2048"),
    ("model from a foreign bucket", {"model": "s3://attacker/m.onnx"}, "$.model", "TESSERA_ALLOWED_BUCKETS"),
    ("model through /vsicurl", {"model": "/vsicurl/http://10.0.0.1/m.onnx"}, "$.model", "GDAL virtual path"),
    ("model outside the local root", {"model": "file:///root/m.onnx"}, "$.model", "give a path under"),
    ("endpoint not configured", {"model": None, "endpoint": {"url": "https://detector.example/inv",
     "tile_size": 512}}, "$.endpoint.url", "TESSERA_ENDPOINT_URLS"),
    ("loopback endpoint", {"model": None, "endpoint": {"url": "http://127.0.0.1:2375/containers",
     "tile_size": 512}}, "$.endpoint.url", "not a model endpoint this deployment allows"),
    ("credentials in an endpoint", {"model": None, "endpoint": {
        "url": "http://u:p@detector.internal:8080/invocations", "tile_size": 512}}, "$.endpoint.url",
     "configure them on the worker"),
    ("non-http endpoint", {"model": None, "endpoint": {"url": "gopher://detector.internal:8080/",
     "tile_size": 512}}, "$.endpoint.url", "http:// or https://"),
    ("'..' in the output key", {"outputs": {"s3": "s3://results/../../etc"}}, "$.outputs.s3", "'..' segment"),
    ("output bucket not allowed", {"outputs": {"s3": "s3://attacker/x"}}, "$.outputs.s3",
     "TESSERA_ALLOWED_BUCKETS"),
    ("query trick in the output", {"outputs": {"s3": "s3://results/x?acl=public"}}, "$.outputs.s3",
     "plain key"),
    ("output prefix too long", {"outputs": {"s3": "s3://results/" + "p" * 1000}}, "$.outputs.s3",
     "keep it under"),
    ("output path outside the root", {"outputs": {"path": "/etc/cron.d/x.geojson"}}, "$.outputs.path",
     "TESSERA_OUTPUT_ROOT"),
    ("'..' in the output path", {"outputs": {"path": "../x.geojson"}}, "$.outputs.path", "'..' segment"),
    ("overwriting a non-GeoJSON file", {"outputs": {"path": "notes.txt"}}, "$.outputs.path", ".geojson"),
    ("file:// output", {"outputs": {"path": "file:///etc/x.geojson"}}, "$.outputs.path", "give a path under"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "path", "says"), [row[1:] for row in HOSTILE], ids=[r[0] for r in HOSTILE]
)
def test_a_hostile_request_is_refused_naming_the_field_and_the_fix(
    policy: TrustPolicy, changes: dict[str, Any], path: str, says: str
) -> None:
    assert says in refusal(good(**changes), policy, path)


def test_every_problem_is_listed_at_once(policy: TrustPolicy) -> None:
    data = good(image="/vsicurl/http://x", model="s3://attacker/m.onnx", outputs={"s3": "s3://results/../x"})
    with pytest.raises(UserError) as caught:
        parse_request(data, policy)
    assert "3 problems" in str(caught.value)


def test_a_symbolic_link_out_of_a_root_is_refused(policy: TrustPolicy, tmp_path: Path) -> None:
    assert policy.local_root is not None and policy.output_root is not None
    (policy.local_root / "escape").symlink_to("/etc")
    (policy.output_root / "escape").symlink_to(tmp_path)
    assert "give a path under" in refusal(good(image="escape/passwd"), policy, "$.image")
    line = refusal(good(outputs={"path": "escape/x.geojson"}), policy, "$.outputs.path")
    assert "give a path under" in line


def test_without_roots_a_queued_request_reads_and_writes_no_local_file() -> None:
    bare = TrustPolicy(confined=True, allowed_buckets=frozenset({"imagery", "models", "results"}))
    assert "may not read local files" in refusal(good(image="/data/a.tif"), bare, "$.image")
    assert "use outputs.s3" in refusal(good(outputs={"path": "/data/a.geojson"}), bare, "$.outputs.path")


def test_what_the_policy_allows_is_accepted_and_normalised(policy: TrustPolicy) -> None:
    assert policy.local_root is not None and policy.output_root is not None
    (policy.local_root / "scenes").mkdir()
    request = parse_request(
        good(
            image="scenes/harbour.tif",
            model=f"file://{policy.local_root}/ships.onnx",
            outputs={"s3": "s3://results/runs/", "path": "runs/harbour.geojson"},
        ),
        policy,
    )
    assert request.image == str(policy.local_root / "scenes" / "harbour.tif")
    assert request.model == str(policy.local_root / "ships.onnx")
    assert request.outputs.path == str(policy.output_root / "runs" / "harbour.geojson")
    assert parse_request(request.to_json(), policy) == request  # what is stored reads back the same
    endpoint = parse_request(good(model=None, endpoint={"url": ENDPOINT, "tile_size": 256}), policy)
    assert endpoint.endpoint is not None and endpoint.endpoint.url == ENDPOINT
    assert parse_request(good(model="ships:3"), policy).model == "ships:3"  # pinned from the registry


def test_tessera_run_keeps_the_users_own_paths_but_never_gdal_tricks(tmp_path: Path) -> None:
    local = TrustPolicy.local()
    request = parse_request(
        good(image="/home/me/a.tif", model="me.onnx", outputs={"path": str(tmp_path / "x.json")}), local
    )
    assert (request.image, request.outputs.path) == ("/home/me/a.tif", str(tmp_path / "x.json"))
    assert parse_request(good(image="s3://any-bucket/a.tif"), local).image == "s3://any-bucket/a.tif"
    assert "GDAL virtual path" in refusal(good(image="/vsicurl/http://x/a.tif"), local, "$.image")
    assert "plain key" in refusal(good(outputs={"s3": "s3://results/a?b"}), local, "$.outputs.s3")


def test_the_policy_is_read_from_the_environment(tmp_path: Path) -> None:
    env = {
        "TESSERA_BUCKET_IMAGERY": "tessera-local-imagery",
        "TESSERA_BUCKET_RESULTS": "tessera-local-results",
        "TESSERA_QUEUE_IMAGE_REQUESTS_URL": "http://q",
        "TESSERA_ENDPOINT_URLS": f"{ENDPOINT}, https://other.internal/inv",
        "TESSERA_OUTPUT_ROOT": str(tmp_path),
    }
    derived = TrustPolicy.from_environment(env)
    assert derived.confined
    assert derived.allowed_buckets == {"tessera-local-imagery", "tessera-local-results"}
    assert derived.endpoint_urls == {ENDPOINT, "https://other.internal/inv"}
    assert derived.output_root == Path(os.path.realpath(tmp_path)) and derived.local_root is None
    listed = TrustPolicy.from_environment({**env, "TESSERA_ALLOWED_BUCKETS": "a-bucket,b-bucket"})
    assert listed.allowed_buckets == {"a-bucket", "b-bucket"}
    assert TrustPolicy.from_environment({}).allowed_buckets == frozenset()


def test_a_queue_worker_handles_its_messages_under_its_policy(policy: TrustPolicy) -> None:
    seen: list[TrustPolicy] = []

    class Probe(QueueWorker):
        def poll(self, wait_s: int | None = None) -> bool:
            seen.append(policy_in_force())
            return False

    assert policy_in_force() == trust.LOCAL
    Probe(trust=policy).poll()
    assert seen == [policy] and policy_in_force() == trust.LOCAL
    with confined(policy), pytest.raises(UserError, match="GDAL virtual path"):
        parse_request(good(image="/vsicurl/http://127.0.0.1/"))


def test_the_rules_are_small_functions_raising_trust_errors(policy: TrustPolicy) -> None:
    assert trust.output_s3("s3://results/a/b", policy) == "s3://results/a/b"
    assert trust.s3_location("s3://imagery/a/b.tif", policy, what="the image") == ("imagery", "a/b.tif")
    with pytest.raises(TrustError, match="not one this deployment"):
        trust.source("s3://nope-bucket/a.tif", policy, what="the image")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
SOURCES = st.sampled_from(
    [
        "s3://imagery/a.tif",
        "s3://results/",
        "/vsicurl?url=http%3A%2F%2F127.0.0.1",
        "file:///etc/passwd",
        "../../etc",
        "s3://",
        "s3://imagery/a?b",
        "file://",
        "file:",
        "://",
        "ships:3",
        "/",
        ".",
        "a\x00b",
        "http://[::1",
        "http://[",
        "s3://ImAgErY/x",
    ]
) | st.text(max_size=40)
URLS = SOURCES | st.builds(lambda tail: "http://" + tail, st.text(max_size=30))
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.just(SCHEMA) | JSON,
        "job_id": st.just("job-1") | JSON,
        "image": SOURCES | JSON,
        "model": SOURCES | JSON,
        "endpoint": st.fixed_dictionaries({"url": URLS | JSON, "tile_size": st.just(64) | JSON}) | JSON,
        "tile_size": st.just([64, 64]) | JSON,
        "overlap": st.just([8, 8]) | JSON,
        "region_size": JSON,
        "roi": st.fixed_dictionaries({"geometry": JSON, "crs": JSON}) | JSON,
        "merge": st.dictionaries(st.sampled_from(["algorithm", "iou", "edge_margin", "x"]), JSON) | JSON,
        "outputs": st.fixed_dictionaries({}, optional={"s3": URLS | JSON, "path": SOURCES | JSON}) | JSON,
        "properties": JSON,
        "batch_size": JSON,
        "extra": JSON,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS | JSON, queued=st.booleans())
def test_no_document_crashes_the_checker(policy: TrustPolicy, document: Any, queued: bool) -> None:
    try:
        request = parse_request(document, policy if queued else TrustPolicy.local())
    except UserError:
        return
    assert isinstance(request, ImageRequest)
    if queued:  # what a queued request was let through stays inside the policy
        assert policy.local_root is not None and policy.output_root is not None
        for source in (request.image, request.model):
            if source is None or (source == request.model and "/" not in source and is_registry_ref(source)):
                continue  # a registry name: pinned to the URI the registry holds
            if source.startswith("s3://"):
                assert source.split("/")[2] in policy.allowed_buckets, source
            else:
                assert policy.local_root in Path(source).parents, source
        if request.outputs.s3:
            assert request.outputs.s3.split("/")[2] in policy.allowed_buckets
        if request.outputs.path:
            assert policy.output_root in Path(request.outputs.path).parents
