"""The sight catalog's HTTP API: FastAPI's TestClient for the unit cases and a real uvicorn server on
loopback for the wire (streamed size cap, auth, a whole upload and recognition), against a real PostgreSQL,
moto's S3 and real ONNX detectors (a fixed tiny one, and the shipped demo detector from S3)."""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from browser import CLASSES, add_ready_model, expected_boxes, fixed_detector
from fastapi.testclient import TestClient
from PIL import Image

from services.cli import main as cli_main
from services.errors import UserError
from services.scenes.synthetic import generate_scene
from services.sight_catalog import warehouse
from services.sight_catalog.api import (
    PROBLEMS,
    Rate,
    RateLimiter,
    RunningServer,
    Settings,
    catalog_token,
    create_app,
)
from services.sight_catalog.photos import draw_photo
from services.sight_catalog.recognition import Recogniser

ROOT = Path(__file__).resolve().parents[2]
DEMO_DETECTOR = ROOT / "services" / "models" / "tessera-demo-detector.onnx"
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 2**20


def jpeg(width: int = 384, height: int = 288, seed: int = 1) -> bytes:
    """A generated landmark photo as JPEG."""
    return draw_photo(seed, size=(width, height)).jpeg(quality=90)


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def files(data: bytes, name: str = "photo.jpg", media: str = "image/jpeg") -> dict[str, Any]:
    return {"file": (name, data, media)}


@pytest.fixture
def catalog(
    conn: psycopg.Connection[Any], database_url: str, datasets: str, tmp_path: Path
) -> dict[str, Any]:
    """Paris with a READY fixed detector (a file), Rome with none; the settings of an app over them."""
    paris, _ = warehouse.request_city(conn, "Paris")
    rome, _ = warehouse.request_city(conn, "Rome")
    model = add_ready_model(conn, paris, str(fixed_detector(tmp_path / "paris.onnx")))
    settings = Settings(database_url=database_url, token=TOKEN, bucket=datasets)
    return {"paris": paris, "rome": rome, "model": model, "settings": settings}


@pytest.fixture
def client(catalog: dict[str, Any]) -> Iterator[TestClient]:
    """A TestClient of the app (token set, bound to loopback: reads open, writes need the token)."""
    with TestClient(create_app(catalog["settings"], recogniser=Recogniser(providers="cpu"))) as test_client:
        yield test_client


def problem(response: Any, status: int, kind: str) -> dict[str, Any]:
    """The response's problem details, checked to be ``kind`` with ``status`` (RFC 9457)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{kind}" and body["status"] == status
    assert body["title"] == PROBLEMS[kind][1] and body["detail"] and body["instance"].startswith("/")
    return body


# --- health, docs, the token --------------------------------------------------------------------------------


def test_health_never_asks_the_database_and_ready_does(
    database_url: str, conn: psycopg.Connection[Any]
) -> None:
    down = Settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    with TestClient(create_app(down)) as broken:
        assert broken.get("/health").json() == {"status": "ok"}
        body = problem(broken.get("/ready"), 503, "database-unavailable")
        assert "not usable" in body["detail"]
        assert broken.get("/ready").headers["retry-after"] == "5"
        problem(broken.get("/api/cities"), 503, "database-unavailable")
    with TestClient(create_app(Settings(database_url=database_url))) as working:
        assert working.get("/ready").json() == {"status": "ready"}
        assert working.get("/health").headers["x-content-type-options"] == "nosniff"


def test_openapi_and_the_docs_page_work_offline(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/api/cities", "/api/cities/{city}", "/api/cities/{city}/recognitions", "/ready"} <= set(paths)
    assert set(paths["/api/cities/{city}/images"]) == {"get", "post"}
    upload = paths["/api/cities/{city}/recognitions"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert "429" in upload["responses"] and "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/docs.js" in docs.text
    for page in (docs.text, client.get("/").text, client.get("/static/docs.js").text):
        assert "cdn" not in page.lower() and "https://" not in page  # nothing from elsewhere
    assert "script-src 'self'" in docs.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/problems/no-model").json()["status"] == 409
    problem(client.get("/problems/nonsense"), 404, "not-found")


def test_the_token_comes_from_the_environment_a_file_or_secrets_manager(
    tmp_path: Path, aws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert catalog_token(env={}) is None
    assert catalog_token(env={"TESSERA_CATALOG_TOKEN": TOKEN}) == TOKEN
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n", encoding="utf-8")
    assert catalog_token(env={"TESSERA_CATALOG_TOKEN_FILE": str(token_file)}) == TOKEN
    assert catalog_token(token_file=token_file, env={"TESSERA_CATALOG_TOKEN": "x" * 20}) == TOKEN
    import boto3

    secrets = boto3.client("secretsmanager", endpoint_url=aws, region_name="us-east-1")
    arn = secrets.create_secret(Name="catalog-token", SecretString=TOKEN)["ARN"]
    assert catalog_token(env={"TESSERA_CATALOG_TOKEN_SECRET_ARN": arn}, secrets_client=secrets) == TOKEN
    # The platform creates the secret empty: the first instance stores a fresh token, every other reads it.
    empty = secrets.create_secret(Name=f"catalog-token-empty-{tmp_path.name}")["ARN"]
    first = catalog_token(env={"TESSERA_CATALOG_TOKEN_SECRET_ARN": empty}, secrets_client=secrets)
    again = catalog_token(env={"TESSERA_CATALOG_TOKEN_SECRET_ARN": empty}, secrets_client=secrets)
    assert first is not None and len(first) >= 32 and first == again
    assert secrets.get_secret_value(SecretId=empty)["SecretString"] == first
    with pytest.raises(UserError, match="at least 16"):
        catalog_token("short")
    with pytest.raises(UserError, match="printable ASCII"):
        catalog_token("a token with spaces in it")
    with pytest.raises(UserError, match="cannot read the token file"):
        catalog_token(env={"TESSERA_CATALOG_TOKEN_FILE": str(tmp_path / "missing")})


def test_beyond_loopback_a_token_is_required_and_reads_need_it_too(
    catalog: dict[str, Any], database_url: str
) -> None:
    with pytest.raises(UserError, match="without a token"):
        Settings(database_url=database_url, host="0.0.0.0")
    exposed = Settings(database_url=database_url, host="0.0.0.0", token=TOKEN)
    assert exposed.reads_need_token and not catalog["settings"].reads_need_token
    with TestClient(create_app(exposed)) as test_client:
        assert test_client.get("/health").status_code == 200
        assert test_client.get("/").status_code == 200  # the UI's files hold no data
        body = problem(test_client.get("/api/cities"), 401, "unauthorized")
        assert "no token" in body["detail"]
        assert test_client.get("/api/cities", headers=AUTH).status_code == 200
        assert test_client.get("/api/cities/paris", headers=AUTH).json()["status"]["model_version"] == 1


# --- cities, sights, models, pages --------------------------------------------------------------------------


def test_cities_come_in_pages_with_next_links(client: TestClient) -> None:
    for name in ("Oslo", "Lima", "Kyoto"):
        assert client.post("/api/cities", json={"name": name}, headers=AUTH).status_code == 201
    seen: list[str] = []
    url: str | None = "/api/cities?limit=2"
    pages = 0
    while url:
        response = client.get(url)
        body = response.json()
        seen += [c["name"] for c in body["items"]]
        url = body["next"]
        if url:
            assert response.headers["link"] == f'<{url}>; rel="next"' and "limit=2" in url
        pages += 1
    assert seen == ["Paris", "Rome", "Oslo", "Lima", "Kyoto"] and pages == 3


def test_requesting_a_city_twice_finds_it_and_its_status_is_live(
    client: TestClient, catalog: dict[str, Any], conn: psycopg.Connection[Any]
) -> None:
    first = client.post("/api/cities", json={"name": "São Paulo"}, headers=AUTH)
    assert first.status_code == 201 and first.headers["location"] == "/api/cities/sao-paulo"
    again = client.post("/api/cities", json={"name": "SÃO PAULO"}, headers=AUTH)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert first.json()["status"] == {
        "state": "no-images",
        "sights": 0,
        "images": 0,
        "labelled_images": 0,
        "labels": 0,
        "model_version": None,
        "training": False,
        "training_version": None,
    }
    paris = client.get("/api/cities/PARIS").json()  # by name, any case
    assert paris["slug"] == "paris" and paris["status"]["state"] == "ready"
    assert paris["status"]["model_version"] == 1 and paris["status"]["sights"] == 2
    sights = client.get("/api/cities/paris/sights?limit=1").json()
    assert [s["name"] for s in sights["items"]] == ["Eiffel Tower"] and sights["next"]
    assert [s["name"] for s in client.get(sights["next"]).json()["items"]] == ["Louvre Pyramid"]
    training = warehouse.start_model(
        conn,
        catalog["paris"].id,
        training_job_id="job-paris-2",
        dataset="s3://d/x",
        classes=list(CLASSES),
        images=20,
        registry_name="sights-paris",
    )
    status = client.get("/api/cities/paris").json()["status"]
    assert (status["training"], status["training_version"], status["model_version"]) == (True, 2, 1)
    models = client.get("/api/cities/paris/models?limit=1").json()
    assert [(m["version"], m["status"]) for m in models["items"]] == [(training.version, "TRAINING")]
    older = client.get(models["next"]).json()
    assert [(m["version"], m["status"], m["classes"]) for m in older["items"]] == [
        (1, "READY", list(CLASSES))
    ]
    assert older["next"] is None


# --- uploads ------------------------------------------------------------------------------------------------


def test_an_upload_is_stored_once_through_ingest(
    client: TestClient, catalog: dict[str, Any], s3: Any, datasets: str
) -> None:
    photo = jpeg(seed=3)
    stored = client.post(
        "/api/cities/paris/images", files=files(photo), data={"sight": "Eiffel Tower"}, headers=AUTH
    )
    assert stored.status_code == 201, stored.text
    image = stored.json()["image"]
    assert stored.json()["duplicate"] is False and (image["width"], image["height"]) == (384, 288)
    assert image["source"] == "upload:photo.jpg" and image["sight_id"] is not None
    key = f"catalog/paris/images/{image['md5']}.jpg"
    assert s3.get_object(Bucket=datasets, Key=key)["ContentType"] == "image/jpeg"
    again = client.post("/api/cities/paris/images", files=files(photo, "other-name.jpg"), headers=AUTH)
    assert again.status_code == 200 and again.json() == {"duplicate": True, "image": image}
    raw = client.post(
        "/api/cities/paris/images", content=png(40, 30), headers={**AUTH, "Content-Type": "image/png"}
    )
    assert raw.status_code == 201 and raw.json()["image"]["media_type"] == "image/png"
    listed = client.get("/api/cities/paris/images").json()["items"]
    assert [i["id"] for i in listed] == [image["id"], raw.json()["image"]["id"]]
    assert client.get("/api/cities/paris").json()["status"]["images"] == 2


# --- recognition --------------------------------------------------------------------------------------------


def test_recognition_answers_boxes_names_and_scores_in_photo_pixels(client: TestClient) -> None:
    response = client.post("/api/cities/paris/recognitions", files=files(jpeg()), headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"], body["model"]["version"]) == (384, 288, 1)
    want = expected_boxes(384, 288)
    assert [(s["sight"], s["score"]) for s in body["sights"]] == [(n, pytest.approx(sc)) for n, sc, _ in want]
    for found, (_, _, box) in zip(body["sights"], want, strict=True):
        assert [found["box"][k] for k in ("x0", "y0", "x1", "y1")] == pytest.approx(box, abs=0.01)
    stricter = client.post("/api/cities/paris/recognitions?min_score=0.7", files=files(jpeg()), headers=AUTH)
    assert [s["sight"] for s in stricter.json()["sights"]] == ["Eiffel Tower"]


def test_recognition_opens_the_newest_ready_model_from_s3_once(
    conn: psycopg.Connection[Any], database_url: str, s3: Any, datasets: str
) -> None:
    city, _ = warehouse.request_city(conn, "Scenes")
    s3.put_object(Bucket=datasets, Key="models/demo.onnx", Body=DEMO_DETECTOR.read_bytes())
    add_ready_model(conn, city, f"s3://{datasets}/models/demo.onnx", ["vehicle", "building", "tank"])
    pixels, truth, classes = generate_scene(512, 384, seed=1_900_000_123)
    out = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(out, format="PNG")
    recogniser = Recogniser(providers="cpu")
    settings = Settings(database_url=database_url)
    with TestClient(create_app(settings, recogniser=recogniser)) as test_client:
        for _ in range(2):
            found = test_client.post("/api/cities/scenes/recognitions", files=files(out.getvalue(), "s.png"))
            assert found.status_code == 200, found.text
        assert len(recogniser.cached()) == 1  # one session for both requests
        sights = found.json()["sights"]
        buildings = [s for s in sights if s["sight"] == "building"]
        assert len(truth[classes == 1]) >= 3 and len(buildings) >= 3
        assert all(0 <= s["box"]["x0"] < s["box"]["x1"] <= 512 for s in sights)
        # A newer READY version (another file) is used from the next request on.
        s3.put_object(Bucket=datasets, Key="models/broken.onnx", Body=b"not a model")
        add_ready_model(conn, city, f"s3://{datasets}/models/broken.onnx", ["vehicle"], registry_version=2)
        body = problem(
            test_client.post("/api/cities/scenes/recognitions", files=files(out.getvalue(), "s.png")),
            503,
            "model-unavailable",
        )
        assert "version 2" in body["detail"] and len(recogniser.cached()) == 1


# --- bad input ----------------------------------------------------------------------------------------------

SQL_NAME = "'; DROP TABLE sight_cities; --"
HTML = b"<!doctype html><html><body>not a photo</body></html>"


@dataclass(frozen=True)
class Bad:
    """A bad request: ``method`` ``path`` with httpx's keyword arguments (the token is sent unless ``token``
    says otherwise), and the problem it must get."""

    what: str
    method: str
    path: str
    status: int
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def bad(what: str, method: str, path: str, status: int, kind: str, **kwargs: Any) -> Any:
    return pytest.param(Bad(what, method, path, status, kind, kwargs), id=what)


BAD_INPUT = [
    bad("unknown city", "GET", "/api/cities/atlantis", 404, "unknown-city"),
    bad(
        "unknown city upload", "POST", "/api/cities/atlantis/images", 404, "unknown-city", files=files(jpeg())
    ),
    bad("SQL-looking unknown city", "GET", "/api/cities/" + SQL_NAME, 404, "unknown-city"),
    bad("0-byte upload", "POST", "/api/cities/paris/images", 400, "empty-upload", files=files(b"")),
    bad(
        "0-byte recognition", "POST", "/api/cities/paris/recognitions", 400, "empty-upload", files=files(b"")
    ),
    bad(
        "non-image upload",
        "POST",
        "/api/cities/paris/images",
        415,
        "unsupported-media-type",
        files=files(HTML, "x.jpg"),
    ),
    bad(
        "truncated JPEG",
        "POST",
        "/api/cities/paris/images",
        422,
        "unreadable-image",
        files=files(jpeg()[:300]),
    ),
    bad(
        "text body",
        "POST",
        "/api/cities/paris/images",
        415,
        "unsupported-media-type",
        content=b"hello",
        headers={"Content-Type": "text/plain"},
    ),
    bad(
        "multipart without a file",
        "POST",
        "/api/cities/paris/images",
        400,
        "bad-upload",
        files={"sight": (None, b"x")},
    ),
    bad(
        "two files",
        "POST",
        "/api/cities/paris/recognitions",
        400,
        "bad-upload",
        files=[("file", ("a.png", png(8, 8), "image/png")), ("file", ("b.png", png(9, 9), "image/png"))],
    ),
    bad("no token", "POST", "/api/cities", 401, "unauthorized", json={"name": "Nowhere"}, token=None),
    bad(
        "wrong token",
        "POST",
        "/api/cities/paris/recognitions",
        401,
        "unauthorized",
        files=files(jpeg()),
        token="x" * 30,
    ),
    bad("a name that is not text", "POST", "/api/cities", 422, "invalid-request", json={"name": True}),
    bad("a blank name", "POST", "/api/cities", 400, "invalid-name", json={"name": "   "}),
    bad("a name of 101 characters", "POST", "/api/cities", 400, "invalid-name", json={"name": "x" * 101}),
    bad(
        "malformed JSON",
        "POST",
        "/api/cities",
        422,
        "invalid-request",
        content=b"{name:",
        headers={"Content-Type": "application/json"},
    ),
    bad("a page of 0", "GET", "/api/cities?limit=0", 422, "invalid-request"),
    bad("a page of 5000", "GET", "/api/cities?limit=5000", 422, "invalid-request"),
    bad("a negative cursor", "GET", "/api/cities?after=-1", 422, "invalid-request"),
    bad(
        "a bad sight name",
        "POST",
        "/api/cities/paris/images",
        400,
        "invalid-name",
        files=files(jpeg()),
        data={"sight": "\x00"},
    ),
    bad(
        "recognition without a model",
        "POST",
        "/api/cities/rome/recognitions",
        409,
        "no-model",
        files=files(jpeg()),
    ),
    bad("no such path", "GET", "/api/nothing", 404, "not-found"),
    bad("wrong method", "DELETE", "/api/cities/paris", 405, "method-not-allowed"),
]


def _send(test_client: TestClient, method: str, path: str, kwargs: dict[str, Any]) -> Any:
    kwargs = dict(kwargs)
    token = kwargs.pop("token", TOKEN)
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return test_client.request(method, path, headers=headers, **kwargs)


def _snapshot(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM sight_cities), (SELECT count(*) FROM sight_images),"
        " (SELECT count(*) FROM sight_sights), (SELECT count(*) FROM sight_models)"
    ).fetchone()
    assert counts is not None
    return tuple(counts)


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_a_clear_problem_and_changes_nothing(
    client: TestClient, conn: psycopg.Connection[Any], s3: Any, datasets: str, case: Bad
) -> None:
    before = _snapshot(conn)
    body = problem(_send(client, case.method, case.path, case.kwargs), case.status, case.kind)
    assert _snapshot(conn) == before
    assert s3.list_objects_v2(Bucket=datasets).get("KeyCount", 0) == 0
    if case.kind == "unauthorized":
        assert "token" in body["detail"]
    if case.kind == "no-model":
        assert "Rome has no model" in body["detail"] and body["city_status"]["state"] == "no-images"
    if case.kind == "invalid-request":
        assert body["errors"] and body["errors"][0]["where"]


def test_odd_city_names_are_just_names(client: TestClient, conn: psycopg.Connection[Any]) -> None:
    sql = client.post("/api/cities", json={"name": SQL_NAME}, headers=AUTH)
    assert sql.status_code == 201 and sql.json()["name"] == SQL_NAME
    assert sql.json()["slug"] == "drop-table-sight-cities"
    true = client.post("/api/cities", json={"name": "True"}, headers=AUTH)
    assert true.status_code == 201 and true.json()["name"] == "True" and true.json()["slug"] == "true"
    assert client.get("/api/cities/True").json()["id"] == true.json()["id"]
    assert client.get("/api/cities/" + SQL_NAME.replace(";", "%3B")).json()["id"] == sql.json()["id"]
    names = [c["name"] for c in client.get("/api/cities").json()["items"]]
    assert names == ["Paris", "Rome", SQL_NAME, "True"]  # and the table is still there


def test_a_duplicate_image_is_answered_with_the_one_stored(
    client: TestClient, conn: psycopg.Connection[Any]
) -> None:
    photo = jpeg(seed=9)
    first = client.post("/api/cities/paris/images", files=files(photo), headers=AUTH)
    before = _snapshot(conn)
    second = client.post("/api/cities/paris/images", files=files(photo, "again.jpg"), headers=AUTH)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["duplicate"] is True and second.json()["image"]["id"] == first.json()["image"]["id"]
    assert _snapshot(conn) == before


def test_a_burst_over_the_rate_limit_is_told_when_to_come_back(catalog: dict[str, Any]) -> None:
    from dataclasses import replace

    settings = replace(catalog["settings"], recognition_rate=Rate(3, 0.05), upload_rate=Rate(1, 0.05))
    with TestClient(create_app(settings, recogniser=Recogniser(providers="cpu"))) as test_client:
        photo = png(64, 48)
        answers = [
            test_client.post("/api/cities/paris/recognitions", files=files(photo, "p.png"), headers=AUTH)
            for _ in range(5)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        body = problem(answers[3], 429, "rate-limited")
        assert answers[3].headers["retry-after"] == str(body["retry_after_s"]) and body["retry_after_s"] >= 1
        # The token is checked first (a stranger learns nothing of the limits); uploads have their own bucket.
        assert (
            test_client.post("/api/cities/paris/recognitions", files=files(photo, "p.png")).status_code == 401
        )
        upload = test_client.post("/api/cities/paris/images", files=files(photo, "p.png"), headers=AUTH)
        assert upload.status_code == 201
        problem(
            test_client.post("/api/cities/paris/images", files=files(png(5, 5), "q.png"), headers=AUTH),
            429,
            "rate-limited",
        )


def test_the_rate_limiter_refills_each_callers_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(Rate(2, 0.5), clock=lambda: now[0], max_callers=2)
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(2.0)
    assert limiter.take("b") == 0.0
    now[0] += 2.0
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(2.0)
    limiter.take("c")  # "b" is forgotten (least recently used): its next bucket is full again
    assert limiter.take("b") == 0.0 and limiter.take("b") == 0.0


# --- a real server on loopback ------------------------------------------------------------------------------


@pytest.fixture
def server(catalog: dict[str, Any]) -> Iterator[RunningServer]:
    """The catalog on a uvicorn server on 127.0.0.1 (an upload cap of 1 MiB)."""
    from dataclasses import replace

    settings = replace(catalog["settings"], max_upload_bytes=MiB)
    running = RunningServer(create_app(settings, recogniser=Recogniser(providers="cpu")))
    yield running
    running.stop()


def _multipart(data: bytes, name: str = "photo.jpg") -> tuple[bytes, str]:
    boundary = "tessera-boundary-7d1"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read one HTTP response from ``sock``."""
    sock.settimeout(10)
    reader = http.client.HTTPResponse(sock)
    reader.begin()
    body = json.loads(reader.read() or b"{}")
    return reader.status, {k.lower(): v for k, v in reader.getheaders()}, body


def test_over_loopback_a_photo_is_uploaded_and_recognised(server: RunningServer) -> None:
    host, port = "127.0.0.1", server.port
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/health")
    assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    connection.request("GET", "/api/cities")
    assert [c["slug"] for c in json.loads(connection.getresponse().read())["items"]] == ["paris", "rome"]
    body, content_type = _multipart(jpeg(seed=4))
    connection.request(
        "POST", "/api/cities/paris/recognitions", body=body, headers={**AUTH, "Content-Type": content_type}
    )
    answer = connection.getresponse()
    found = json.loads(answer.read())
    assert answer.status == 200 and [s["sight"] for s in found["sights"]] == [
        "Eiffel Tower",
        "Louvre Pyramid",
    ]
    connection.request(
        "POST", "/api/cities/paris/images", body=body, headers={**AUTH, "Content-Type": content_type}
    )
    stored = connection.getresponse()
    assert stored.status == 201 and json.loads(stored.read())["duplicate"] is False
    connection.request("POST", "/api/cities/paris/images", body=body, headers={"Content-Type": content_type})
    refused = connection.getresponse()
    assert refused.status == 401 and refused.getheader("WWW-Authenticate") == 'Bearer realm="tessera-sights"'
    refused.read()
    connection.close()


def test_over_loopback_200_mb_is_refused_before_its_body_is_read(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/cities/paris/images HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {200 * MiB}\r\n\r\n".encode()
        )
        status, headers, body = _response(sock)  # answered with no byte of the body sent
    assert status == 413 and headers["content-type"] == "application/problem+json"
    assert body["type"] == "/problems/upload-too-large" and body["limit_bytes"] == MiB


def test_over_loopback_a_streamed_body_is_cut_off_at_the_cap(server: RunningServer) -> None:
    """A chunked upload (no Content-Length) of up to 200 MB: the server stops at the 1 MiB cap and answers
    413 while the client is still sending; far less than 200 MB ever crossed."""
    sent = 0
    chunk = b"\xff\xd8\xff" + bytes(64 * 1024 - 3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/cities/paris/recognitions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        deadline = time.monotonic() + 20
        while sent < 200 * MiB and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, _, body = _response(sock)
    assert status == 413 and body["type"] == "/problems/upload-too-large"
    assert MiB <= sent < 40 * MiB


# --- the command line ---------------------------------------------------------------------------------------


def test_the_cities_and_ingest_commands(
    database_url: str,
    datasets: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TESSERA_DB_URL", database_url)
    monkeypatch.setenv("TESSERA_BUCKET_DATASETS", datasets)
    folder = tmp_path / "photos" / "Eiffel Tower"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg(seed=11))
    (folder / "b.jpg").write_bytes(jpeg(seed=12))
    (folder / "notes.txt").write_text("not a photo", encoding="utf-8")
    assert cli_main(["sights", "cities", "--add", "Paris"]) == 0
    assert cli_main(["sights", "ingest", "Paris", str(tmp_path / "photos")]) == 0
    out = capsys.readouterr().out
    assert "Paris: 2 accepted, 0 duplicates, 1 rejected, 0 skipped" in out
    assert cli_main(["sights", "cities", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["status"]["images"], c["status"]["sights"]) for c in listed] == [("Paris", 2, 1)]
    detector = fixed_detector(tmp_path / "paris.onnx")
    assert cli_main(["sights", "label", "Paris", "--model", str(detector), "--providers", "cpu"]) == 0
    assert "model:fixed-sights@cli: 2 images labelled (2 boxes)" in capsys.readouterr().out
    assert cli_main(["sights", "ingest", "Atlantis", str(tmp_path / "photos")]) == 2
    assert "no city called 'Atlantis'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["sights", "serve", "--help"])
    assert "--token-file" in capsys.readouterr().out


def test_serve_refuses_every_interface_without_a_token(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESSERA_DB_URL", database_url)
    monkeypatch.delenv("TESSERA_CATALOG_TOKEN", raising=False)
    assert cli_main(["sights", "serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without a token" in capsys.readouterr().err
