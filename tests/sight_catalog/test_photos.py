"""Generated landmark photos: reproducible by seed, boxes inside the image and tight around what was drawn,
EXIF-turned copies, and the trainer's detector dataset format."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from services.errors import UserError
from services.sight_catalog.photos import (
    ASPECT,
    LANDMARKS,
    SIZE,
    draw_photo,
    draw_photos,
    exif_oriented_jpeg,
    plan_photo,
    render_photo,
    write_scenes,
)


def test_a_seed_makes_the_same_photo() -> None:
    assert draw_photo(5).jpeg() == draw_photo(5).jpeg()
    assert draw_photo(5).png() == draw_photo(5).png()
    assert plan_photo(5) == plan_photo(5)
    assert draw_photo(5).jpeg() != draw_photo(6).jpeg()
    assert draw_photo(5).landmarks == draw_photo(5).landmarks


def test_photos_decode_as_jpeg_and_png_of_the_size_asked() -> None:
    photo = draw_photo(1, size=(320, 256))
    for data, fmt in ((photo.jpeg(), "JPEG"), (photo.png(), "PNG")):
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size, image.mode) == (fmt, (320, 256), "RGB")
    assert photo.image.size == (320, 256)


def test_boxes_are_inside_the_image_and_not_tiny() -> None:
    width, height = SIZE
    kinds_seen = set()
    pairs = 0
    for seed in range(60):
        photo = draw_photo(seed)
        assert 1 <= len(photo.landmarks) <= 2
        pairs += len(photo.landmarks) == 2
        for landmark in photo.landmarks:
            x0, y0, x1, y1 = landmark.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert y1 - y0 >= 0.15 * height, (seed, landmark)
            kinds_seen.add(landmark.kind)
        if len(photo.landmarks) == 2:
            a, b = (m.box for m in photo.landmarks)
            assert a[2] <= b[0] or b[2] <= a[0], "two landmarks side by side, never overlapping"
    assert kinds_seen == set(LANDMARKS)
    assert 3 <= pairs <= 25


def test_the_main_landmark_is_the_one_asked_for_and_keeps_its_shape() -> None:
    for kind in LANDMARKS:
        for seed in range(4):
            photo = draw_photo(seed, main=kind, second=0.0)
            (landmark,) = photo.landmarks
            assert landmark.kind == kind
            x0, y0, x1, y1 = landmark.box
            assert (x1 - x0) / (y1 - y0) == pytest.approx(ASPECT[kind], rel=0.12)


@pytest.mark.parametrize("seed", [0, 3, 7, 11, 19, 23])
def test_each_box_is_tight_around_the_pixels_its_landmark_changed(seed: int) -> None:
    plan = dataclasses.replace(plan_photo(seed, second=0.5), blur=0.0)
    background, none = render_photo(plan, show=())
    assert none == []
    pixels = np.asarray(background, dtype=np.int16)
    for index in range(len(plan.placements)):
        image, (landmark,) = render_photo(plan, show=(index,))
        changed = np.abs(np.asarray(image, dtype=np.int16) - pixels).max(axis=2) > 0
        rows, cols = np.nonzero(changed)
        drawn = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        assert np.allclose(drawn, landmark.box, atol=1), (seed, landmark, drawn)
        # Nothing changed outside the box.
        x0, y0, x1, y1 = landmark.box
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()


def test_the_kinds_look_different() -> None:
    """The mean colour inside the box differs between kinds more than within one kind (a crude but real
    sign that a detector has something to tell them apart by)."""
    means = {
        kind: [
            np.asarray(p.image.crop(p.landmarks[0].box), dtype=np.float32).reshape(-1, 3).mean(axis=0)
            for p in (draw_photo(s, main=kind, second=0.0) for s in range(6))
        ]
        for kind in LANDMARKS
    }
    centres = {kind: np.mean(values, axis=0) for kind, values in means.items()}
    for kind in LANDMARKS:
        spread = max(float(np.linalg.norm(v - centres[kind])) for v in means[kind])
        nearest = min(float(np.linalg.norm(centres[kind] - centres[o])) for o in LANDMARKS if o != kind)
        assert nearest > 0 and spread < 4 * nearest, kind


def test_draw_photos_takes_turns() -> None:
    photos = draw_photos(10, 6, kinds=("tower", "arch"), second=0.0)
    assert [p.landmarks[0].kind for p in photos] == ["tower", "arch"] * 3
    assert [p.plan.seed for p in photos] == list(range(10, 16))


def test_bad_requests_are_user_errors() -> None:
    with pytest.raises(UserError, match="not castle"):
        draw_photo(1, kinds=("castle",))
    with pytest.raises(UserError, match="not castle"):
        draw_photo(1, main="castle")
    with pytest.raises(UserError, match="at least 64"):
        draw_photo(1, size=(32, 300))
    with pytest.raises(UserError, match=r"2\.\.8"):
        exif_oriented_jpeg(draw_photo(1).image, 1)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_exif_oriented_copy_turns_back_upright(orientation: int) -> None:
    photo = draw_photo(2)
    data = exif_oriented_jpeg(photo.image, orientation)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.getexif().get(0x0112) == orientation
        raw = stored.convert("RGB")
        upright = ImageOps.exif_transpose(stored).convert("RGB")
    turned = orientation in (6, 8)
    assert raw.size == (SIZE[::-1] if turned else SIZE)
    assert upright.size == SIZE
    assert _difference(upright, photo.image) < 3  # JPEG's loss only
    if not turned:
        assert _difference(raw, photo.image) > 10


def _difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two images seen small (noise and JPEG artefacts averaged away)."""
    small = [np.asarray(i.resize((48, 36), Image.Resampling.BOX), dtype=np.float32) for i in (a, b)]
    return float(np.abs(small[0] - small[1]).mean())


def test_photos_are_a_detector_dataset(tmp_path: Path) -> None:
    from services.trainer.tasks.detector import load_scenes

    photos = draw_photos(0, 5, kinds=("tower", "dome", "wheel"))
    folder = write_scenes(tmp_path / "scenes", photos)
    classes = json.loads((folder / "classes.json").read_text())
    assert classes == [k for k in LANDMARKS if any(m.kind == k for p in photos for m in p.landmarks)]
    scenes, loaded = load_scenes(folder, crop=256)
    assert list(loaded) == classes and len(scenes) == 5
    boxes = sorted(tuple(float(v) for v in box) for scene in scenes for box in scene.boxes)
    assert boxes == sorted(tuple(float(v) for v in m.box) for p in photos for m in p.landmarks)
