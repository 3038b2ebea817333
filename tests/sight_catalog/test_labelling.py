"""Labelling: labellings and boxes in PostgreSQL, the city's detector and Amazon Rekognition as labellers
(Rekognition against a loopback stub answering recorded responses, and against moto), and the worker step."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psycopg
import pytest
from labelling_fixtures import add_city, add_image, encoded, labellings
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from rekognition_stub import ARN, RekognitionStub

from services.cloud.database import apply_migrations, connect, migrations
from services.cloud.embedded import Resources, free_port
from services.cloud.objects import s3_client
from services.errors import UserError
from services.scenes.synthetic import generate_scene
from services.sight_catalog import labels
from services.sight_catalog.labelling import (
    BudgetExhaustedError,
    CityBudget,
    DetectorLabeller,
    ImageRejectedError,
    LabellerUnavailableError,
    S3ImageStore,
    SightNames,
    label_city,
)
from services.sight_catalog.labels import Box
from services.sight_catalog.rekognition import RekognitionLabeller, rekognition_client

ROOT = Path(__file__).resolve().parents[2]
DEMO_DETECTOR = ROOT / "services" / "models" / "tessera-demo-detector.onnx"


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a fresh database holding the sight catalog's tables."""
    conn = connect(database_url)
    apply_migrations(conn, [m for m in migrations() if m.package == "sight_catalog"])
    yield conn
    conn.close()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[RekognitionStub]:
    """The Rekognition stand-in, and dummy credentials for the clients that call it."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = RekognitionStub().start()
    yield server
    server.stop()


def rekognition(stub: RekognitionStub, **kwargs: Any) -> RekognitionLabeller:
    """A labeller calling the stub, never pausing between throttled calls."""
    pauses: list[float] = kwargs.pop("pauses", [])
    return RekognitionLabeller(
        ARN, client=rekognition_client(stub.endpoint, region="us-east-1"), sleep=pauses.append, **kwargs
    )


class Memory:
    """An image store in memory."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def read(self, key: str) -> bytes:
        if key not in self.objects:
            raise UserError(f"s3://datasets/{key} does not exist")
        return self.objects[key]


def key_of(conn: psycopg.Connection[Any], image_id: int) -> str:
    row = conn.execute("SELECT s3_key FROM sight_images WHERE id = %s", (image_id,)).fetchone()
    assert row is not None
    return str(row[0])


# --- labellings and labels in the warehouse ------------------------------------------------------------


def test_a_labelling_is_recorded_once_with_its_boxes_clipped(db: psycopg.Connection[Any]) -> None:
    city = add_city(db)
    image = add_image(db, city, encoded(200, 100), width=200, height=100)
    boxes = [
        Box("Eiffel Tower", 10, 10, 50, 90, 0.9),
        Box("louvre pyramid", 150, 50, 260, 140, 1.5),  # spills out: clipped; score clamped; any case
        Box("Eiffel Tower", 30, 30, 30, 60, 0.8),  # empty
        Box("Eiffel Tower", math.nan, 0, 10, 10, 0.8),  # not a number
        Box("Arc de Triomphe", -20, -5, 10, 10, None),  # a person's box, partly outside
        Box("Eiffel Tower", 210, 0, 260, 50, 0.7),  # wholly outside
    ]
    first = labels.record_labelling(db, image, "annotator:ana", boxes)
    assert (first.new, first.boxes, first.dropped) == (True, 3, 3)

    stored = labels.labels_of(db, image)
    assert [(b.sight, b.x0, b.y0, b.x1, b.y1, b.score) for b in stored] == [
        ("Eiffel Tower", 10, 10, 50, 90, 0.9),
        ("Louvre Pyramid", 150, 50, 200, 100, 1.0),
        ("Arc de Triomphe", 0, 0, 10, 10, None),
    ]
    again = labels.record_labelling(db, image, "annotator:ana", [Box("Eiffel Tower", 1, 1, 2, 2, 0.5)])
    assert (again.new, again.boxes, again.labelled_at) == (False, 3, first.labelled_at)
    assert len(labels.labels_of(db, image)) == 3
    assert labels.find_labelling(db, image, "annotator:ana") == again

    nothing = labels.record_labelling(db, image, "rekognition", [])
    assert (nothing.new, nothing.boxes) == (True, 0)
    assert labels.labels_of(db, image, labeller="rekognition") == []
    assert labellings(db, "rekognition") == {image: 0}


def test_a_labelling_naming_no_sight_of_the_city_records_nothing(db: psycopg.Connection[Any]) -> None:
    paris = add_city(db)
    rome = add_city(db, "rome", sights=["Colosseum"])
    image = add_image(db, paris, encoded(64, 64), width=64, height=64)
    for wrong in ("Colosseum", "Big Ben"):
        with pytest.raises(UserError, match=f"no sight '{wrong}'"):
            labels.record_labelling(
                db, image, "annotator:ana", [Box("Eiffel Tower", 1, 1, 9, 9), Box(wrong, 1, 1, 5, 5)]
            )
    assert labellings(db, "annotator:ana") == {}
    with pytest.raises(UserError, match="no image 999"):
        labels.record_labelling(db, 999, "annotator:ana", [])
    with pytest.raises(UserError, match="labeller"):
        labels.record_labelling(db, image, " ", [])
    assert labels.sight_names(db, rome) == ["Colosseum"]


def test_images_to_label_are_the_labellers_own_oldest_first(db: psycopg.Connection[Any]) -> None:
    city = add_city(db)
    other = add_city(db, "rome", sights=["Colosseum"])
    ids = [add_image(db, city, encoded(64, 64, seed=i), width=64, height=64) for i in range(3)]
    add_image(db, other, encoded(64, 64, seed=9), width=64, height=64)
    labels.record_labelling(db, ids[1], "rekognition", [])
    assert [i.id for i in labels.images_to_label(db, city, "rekognition")] == [ids[0], ids[2]]
    assert [i.id for i in labels.images_to_label(db, city, "model:paris@1")] == ids
    first = labels.images_to_label(db, city, "model:paris@1", limit=1)
    assert [(i.id, i.width, i.height, i.media_type) for i in first] == [(ids[0], 64, 64, "image/png")]
    with pytest.raises(UserError):
        labels.images_to_label(db, city, "rekognition", limit=0)


def test_the_budget_is_spent_refunded_and_set(db: psycopg.Connection[Any]) -> None:
    city = add_city(db, budget=3)
    assert [labels.spend(db, city) for _ in range(4)] == [True, True, True, False]
    assert labels.budget_of(db, city) == labels.Budget(city, 3, 3)
    labels.refund(db, city)
    assert labels.remaining(db, city) == 1
    assert labels.spend(db, city, calls=2) is False  # both or none
    with pytest.raises(UserError, match="made 2 labelling calls already"):
        labels.set_budget(db, city, 1)
    assert labels.set_budget(db, city, 10).remaining == 8
    assert labels.spend(db, city, calls=8) is True and labels.remaining(db, city) == 0
    with pytest.raises(UserError, match="no city 999"):
        labels.spend(db, 999)
    for wrong in (-1, 2**31):
        with pytest.raises(UserError):
            labels.set_budget(db, city, wrong)
    with pytest.raises(UserError):
        labels.spend(db, city, calls=0)


def test_an_image_is_claimed_by_one_worker_at_a_time(db: psycopg.Connection[Any], database_url: str) -> None:
    city = add_city(db)
    image = add_image(db, city, encoded(64, 64), width=64, height=64)
    with connect(database_url) as other:
        assert labels.claim(db, image, "rekognition")
        assert not labels.claim(other, image, "rekognition")
        assert labels.claim(other, image, "model:paris@1")  # another labeller's claim
        labels.release(db, image, "rekognition")
        assert labels.claim(other, image, "rekognition")


def test_sight_names_match_exactly_then_loosely_then_by_alias() -> None:
    names = SightNames(
        ["Eiffel Tower", "eiffel tower", "Louvre Pyramid"],
        {"Tour Eiffel": "Eiffel Tower", "Big Ben": "Big Ben"},
    )
    assert names.match("eiffel tower") == "eiffel tower"  # exact wins
    assert names.match("EIFFEL_TOWER") == "Eiffel Tower"
    assert names.match("louvre-pyramid ") == "Louvre Pyramid"
    assert names.match("tour  eiffel") == "Eiffel Tower"
    assert names.match("Big Ben") is None  # an alias of no sight of this city
    assert names.match("pigeon") is None


# --- the city's detector -----------------------------------------------------------------------------

TILE = 64
#: Per output row: box (x1, y1, x2, y2) in tile pixels, score = tile mean x gain, class label.
ROWS = [
    ((8, 4, 24, 40), 1.0, 0),  # "Eiffel Tower"
    ((0, 0, 10, 10), 1.0, 1),  # "pigeon": no sight of the city
    ((40, 20, 72, 64), 1.0, 2),  # "LOUVRE_PYRAMID", reaches into the letterbox padding
    ((0, 50, 16, 60), 1.0, 3),  # "Tour Eiffel" (an alias), wholly in the padding
    ((30, 30, 34, 34), 0.4, 0),  # scores 0.3 on a white photo: under the labeller's threshold 0.5
]
CLASSES = ["Eiffel Tower", "pigeon", "LOUVRE_PYRAMID", "Tour Eiffel"]


def tiny_detector(path: Path) -> Path:
    """A contract detector that always returns ROWS, scored by the tile's mean (so by what was fed in)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, TILE, TILE])
    boxes = np.array([[r[0] for r in ROWS]], np.float32)
    gains = np.array([[r[1] for r in ROWS]], np.float32)
    classes = np.array([[r[2] for r in ROWS]], np.int64)
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "n11"], ["mean3"]),
        helper.make_node("Reshape", ["mean4", "n1"], ["mean2"]),
        helper.make_node("Mul", ["mean3", "zero"], ["zeros3"]),
        helper.make_node("Add", ["zeros3", "box_rows"], ["boxes"]),
        helper.make_node("Mul", ["mean2", "gains"], ["scores"]),
        helper.make_node("Shape", ["scores"], ["nk"]),
        helper.make_node("Expand", ["class_rows", "nk"], ["labels"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "n11"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "n1"),
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
        numpy_helper.from_array(boxes, "box_rows"),
        numpy_helper.from_array(gains, "gains"),
        numpy_helper.from_array(classes, "class_rows"),
    ]
    k = len(ROWS)
    outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", k]),
    ]
    graph = helper.make_graph(nodes, "tiny_sights", [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"tessera.class_names": json.dumps(CLASSES), "tessera.name": "tiny-sights"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def white(width: int, height: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(out, format=fmt)
    return out.getvalue()


def test_the_detector_labels_in_photo_pixels_with_the_citys_sight_names(tmp_path: Path) -> None:
    labeller = DetectorLabeller.open(
        tiny_detector(tmp_path / "tiny.onnx"),
        version=3,
        aliases={"Tour Eiffel": "Eiffel Tower"},
        score_threshold=0.5,
        providers="cpu",
    )
    assert (labeller.name, labeller.external) == ("model:tiny-sights@3", False)
    # 128 x 96 is letterboxed into 64 x 64 at half size: 64 x 48 of photo, 16 rows of padding.
    found = labeller.label(white(128, 96), ["Eiffel Tower", "Louvre Pyramid", "Arc de Triomphe"])
    # White pixels / 255 over 3/4 of the tile: every score is 0.75 x its gain.
    assert found == [
        Box("Eiffel Tower", 16, 8, 48, 80, 0.75),
        Box("Louvre Pyramid", 80, 40, 128, 96, 0.75),
    ]
    # A photo smaller than the tile is enlarged to fill it: 32 x 32 at twice the size.
    small = labeller.label(white(32, 32), ["Eiffel Tower"])
    assert small == [Box("Eiffel Tower", 4, 2, 12, 20, 1.0), Box("Eiffel Tower", 0, 25, 8, 30, 1.0)]
    with pytest.raises(ImageRejectedError, match="not an image"):
        labeller.label(b"<html>not a photo</html>", ["Eiffel Tower"])


def test_the_demo_detector_finds_its_classes_named_as_sights() -> None:
    pixels, truth, classes = generate_scene(512, 384, seed=1_900_000_123)
    out = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(out, format="PNG")
    labeller = DetectorLabeller.open(DEMO_DETECTOR, version=1, score_threshold=0.3, providers="cpu")
    assert labeller.name == "model:tessera-demo-detector@1"
    found = labeller.label(out.getvalue(), ["Building", "Vehicle"])  # no "tank" sight: tanks ignored
    assert found and {b.sight for b in found} <= {"Building", "Vehicle"}
    assert all(0 <= b.x0 < b.x1 <= 512 and 0 <= b.y0 < b.y1 <= 384 for b in found)
    buildings = truth[classes == 1]
    hits = sum(
        any(_iou(true, (b.x0, b.y0, b.x1, b.y1)) >= 0.5 for b in found if b.sight == "Building")
        for true in buildings
    )
    assert len(buildings) >= 3 and hits >= 0.7 * len(buildings)


def _iou(a: Any, b: Any) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_label_city_with_the_detector_records_every_image_once(
    db: psycopg.Connection[Any], resources: Resources, tmp_path: Path
) -> None:
    city = add_city(db, budget=0)  # a local detector spends no budget
    s3 = s3_client()
    bucket = resources.buckets["datasets"]
    ids = [
        add_image(db, city, white(128, 96 + i), width=128, height=96 + i, s3=s3, bucket=bucket)
        for i in range(3)
    ]
    missing = add_image(db, city, white(10, 10), width=10, height=10)  # its bytes never reached S3
    labeller = DetectorLabeller.open(
        tiny_detector(tmp_path / "tiny.onnx"), version=1, name="paris", score_threshold=0.5, providers="cpu"
    )
    run = label_city(db, city, labeller, S3ImageStore(bucket), limit=10)
    assert (run.labelled, run.boxes, run.calls, run.skipped_for_budget, run.stopped) == (3, 6, 0, 0, None)
    assert [(f.image_id, f.recorded) for f in run.failed] == [(missing, False)]
    assert "does not exist" in run.failed[0].reason
    assert labellings(db, "model:paris@1") == dict.fromkeys(ids, 2)
    assert labels.remaining(db, city) == 0

    again = label_city(db, city, labeller, S3ImageStore(bucket), limit=10)
    assert (again.labelled, [f.image_id for f in again.failed]) == (0, [missing])


# --- Amazon Rekognition -------------------------------------------------------------------------------


def test_rekognition_sends_the_image_to_the_citys_model_and_maps_its_answer(stub: RekognitionStub) -> None:
    image = encoded(400, 200)
    labeller = rekognition(stub, aliases={"Tour Eiffel": "Eiffel Tower"}, min_confidence=50)
    assert (labeller.name, labeller.external) == ("rekognition", True)
    found = labeller.label(image, ["Eiffel Tower", "Louvre Pyramid", "Arc de Triomphe"])

    (sent,) = stub.received
    assert sent.operation == "DetectCustomLabels" and sent.authorized
    assert sent.body["ProjectVersionArn"] == ARN and sent.body["MinConfidence"] == 50
    assert sent.image == image
    # Ratios of 400 x 200; "louvre_pyramid" spills out (clipped); "Arc de Triomphe" has no box, "Seine"
    # is no sight, and an empty box is dropped.
    assert [(b.sight, b.x0, b.y0, b.x1, b.y1) for b in found] == [
        ("Eiffel Tower", 200, 25, 300, 175),
        ("Louvre Pyramid", 350, 100, 400, 150),
        ("Eiffel Tower", 0, 0, 50, 50),
    ]
    assert [b.score for b in found] == pytest.approx([0.98613, 0.875, 0.6125], abs=1e-5)


def test_rekognition_gets_jpeg_for_formats_it_does_not_take(stub: RekognitionStub) -> None:
    image = white(400, 200, fmt="WEBP")
    found = rekognition(stub).label(image, ["Eiffel Tower"])
    (sent,) = stub.received
    assert sent.image.startswith(b"\xff\xd8\xff")
    assert Image.open(io.BytesIO(sent.image)).size == (400, 200)
    assert (found[0].sight, found[0].x0, found[0].y0, found[0].x1, found[0].y1) == (
        "Eiffel Tower",
        200,
        25,
        300,
        175,
    )


def test_rekognition_gets_photos_upright(stub: RekognitionStub) -> None:
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 200 x 100 pixels are a 100 x 200 photo
    Image.new("RGB", (200, 100), (10, 200, 10)).save(out, format="JPEG", exif=exif.tobytes())
    found = rekognition(stub).label(out.getvalue(), ["Eiffel Tower"])
    (sent,) = stub.received
    upright = Image.open(io.BytesIO(sent.image))
    assert upright.size == (100, 200) and upright.getexif().get(0x0112, 1) == 1
    assert (found[0].x0, found[0].y0, found[0].x1, found[0].y1) == (50, 25, 75, 175)


def test_throttled_calls_are_retried_and_each_is_spent(
    db: psycopg.Connection[Any], stub: RekognitionStub
) -> None:
    city = add_city(db, budget=5)
    stub.answer(["throttling_exception", "provisioned_throughput_exceeded"])
    pauses: list[float] = []
    budget = CityBudget(db, city)
    found = rekognition(stub, pauses=pauses, backoff_s=1.0).label(
        encoded(400, 200), ["Eiffel Tower"], budget=budget
    )
    assert len(found) == 1 and len(stub.received) == 3
    assert budget.calls == 3 and labels.budget_of(db, city).used == 3
    assert len(pauses) == 2 and 0.5 <= pauses[0] <= 1.0 and 1.0 <= pauses[1] <= 2.0

    stub.answer(["throttling_exception"] * 2)
    with pytest.raises(LabellerUnavailableError, match="throttled 2 calls in a row"):
        rekognition(stub, max_attempts=2).label(encoded(400, 200), ["Eiffel Tower"], budget=budget)
    assert labels.budget_of(db, city).used == 5 and len(stub.received) == 5

    with pytest.raises(BudgetExhaustedError):  # nothing left: no call goes out
        rekognition(stub).label(encoded(400, 200), ["Eiffel Tower"], budget=budget)
    assert len(stub.received) == 5


def test_a_call_that_never_left_is_refunded(db: psycopg.Connection[Any], stub: RekognitionStub) -> None:
    city = add_city(db, budget=2)
    closed = RekognitionLabeller(ARN, client=rekognition_client(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(LabellerUnavailableError, match="cannot be reached"):
        closed.label(encoded(100, 100), ["Eiffel Tower"], budget=CityBudget(db, city))
    assert labels.budget_of(db, city).used == 0


def test_label_city_with_rekognition_records_rejected_images_and_spends_per_call(
    db: psycopg.Connection[Any], stub: RekognitionStub
) -> None:
    city = add_city(db, budget=10)
    objects = {}
    ids = []
    for data, width, height in [
        (encoded(400, 200, seed=1), 400, 200),
        (encoded(400, 200, seed=2), 400, 200),  # Rekognition refuses it
        (b"GIF89a broken", 400, 200),  # not an image: refused here
        (encoded(80, 40), 80, 40),  # nothing on it
    ]:
        ids.append(add_image(db, city, data, width=width, height=height))
        objects[key_of(db, ids[-1])] = data
    stub.answer(["detect_custom_labels", "invalid_image_format", "no_custom_labels"])
    run = label_city(db, city, rekognition(stub, aliases={"Tour Eiffel": "Eiffel Tower"}), Memory(objects))

    assert (run.labelled, run.boxes, run.calls, run.stopped) == (2, 3, 3, None)
    assert [(f.image_id, f.recorded) for f in run.failed] == [(ids[1], True), (ids[2], True)]
    assert "InvalidImageFormatException: Request has invalid image format" in run.failed[0].reason
    assert "not an image" in run.failed[1].reason  # refused here: never sent, never spent
    assert len(stub.received) == 3 and labels.budget_of(db, city).used == 3
    assert labellings(db, "rekognition") == {ids[0]: 3, ids[1]: 0, ids[2]: 0, ids[3]: 0}
    assert {b.sight for b in labels.labels_of(db, ids[0])} == {"Eiffel Tower", "Louvre Pyramid"}
    outcomes = dict(
        (row[0], (row[1], row[2]))
        for row in db.execute(
            "SELECT image_id, status, reason FROM sight_labellings WHERE labeller = 'rekognition'"
        ).fetchall()
    )
    assert outcomes[ids[0]] == ("DONE", None) and outcomes[ids[3]] == ("DONE", None)
    assert outcomes[ids[1]][0] == "REJECTED" and "InvalidImageFormatException" in outcomes[ids[1]][1]
    assert outcomes[ids[2]][0] == "REJECTED" and "not an image" in outcomes[ids[2]][1]

    again = label_city(db, city, rekognition(stub), Memory(objects))
    assert (again.labelled, again.calls, len(stub.received)) == (0, 0, 3)


def test_a_model_that_is_not_running_stops_the_round(
    db: psycopg.Connection[Any], stub: RekognitionStub
) -> None:
    city = add_city(db, budget=10)
    objects = {}
    for i in range(3):
        image = add_image(db, city, encoded(64, 64, seed=i), width=64, height=64)
        objects[key_of(db, image)] = encoded(64, 64, seed=i)
    stub.answer(["resource_not_ready"])
    run = label_city(db, city, rekognition(stub), Memory(objects))
    assert run.stopped is not None and "ResourceNotReadyException" in run.stopped
    assert (run.labelled, run.calls, len(stub.received)) == (0, 1, 1)  # it was sent: it counts
    assert labellings(db, "rekognition") == {}


def test_rekognition_against_moto(mocked_aws: Any) -> None:
    client = mocked_aws.client("rekognition")
    labeller = RekognitionLabeller(ARN, client=client, aliases={"MyLogo": "Louvre Pyramid"})
    (box,) = labeller.label(encoded(1000, 500), ["Louvre Pyramid"])
    # moto's canned DetectCustomLabels answer: one "MyLogo" box.
    assert box.sight == "Louvre Pyramid"
    assert (box.x0, box.y0) == pytest.approx((79.245, 201.870), abs=1e-3)
    assert (box.x1 - box.x0, box.y1 - box.y0) == pytest.approx((198.988, 156.481), abs=1e-3)
    assert box.score == pytest.approx(0.7777, abs=1e-4)
