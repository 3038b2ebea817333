"""Synthetic scenes: deterministic, objects inside and apart, labels valid, the pixels hold the objects."""

from __future__ import annotations

import numpy as np
import pytest

from services.errors import UserError
from services.scenes.synthetic import (
    DEFAULT_CLASSES,
    content_areas,
    generate_scene,
    layout_scene,
    render_window,
)


def object_pixels(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Where a scene differs visibly from its object-free background: bool [H, W]."""
    return np.abs(pixels.astype(np.int16) - background.astype(np.int16)).max(axis=0) > 12


def footprint_mask(boxes: np.ndarray, height: int, width: int, reach: int = 3) -> np.ndarray:
    """Pixels an object may paint: its box plus ``reach`` px right and below (building shadows)."""
    mask = np.zeros((height, width), bool)
    for x1, y1, x2, y2 in boxes.astype(int):
        mask[y1 : y2 + reach, x1 : x2 + reach] = True
    return mask


def test_same_seed_same_scene_and_another_seed_another() -> None:
    first = generate_scene(384, 300, seed=11)
    again = generate_scene(384, 300, seed=11)
    other = generate_scene(384, 300, seed=12)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize(("width", "height", "seed"), [(512, 512, 0), (777, 301, 5), (130, 900, 9)])
def test_objects_are_inside_apart_and_labelled(width: int, height: int, seed: int) -> None:
    pixels, boxes, labels = generate_scene(width, height, seed=seed, density=150)
    assert pixels.shape == (3, height, width) and pixels.dtype == np.uint8
    assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
    assert labels.dtype == np.int32
    assert len(labels) >= 0.5 * 150 * width * height / 1e6
    assert set(labels.tolist()) <= set(range(len(DEFAULT_CLASSES)))
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # No two boxes touch: every pair is separated along x or y.
    x1, y1, x2, y2 = (boxes[:, i][:, None] for i in range(4))
    overlap = (x1 < x2.T) & (x2 > x1.T) & (y1 < y2.T) & (y2 > y1.T)
    np.fill_diagonal(overlap, False)
    assert not overlap.any()


def test_sizes_follow_the_classes() -> None:
    _, boxes, labels = generate_scene(2048, 1024, seed=3, density=120)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    long_side, short_side = np.maximum(w, h), np.minimum(w, h)
    vehicle, building, tank = (labels == i for i in range(3))
    assert vehicle.sum() > 20 and building.sum() > 20 and tank.sum() > 20
    assert ((long_side[vehicle] >= 12) & (long_side[vehicle] <= 20) & (short_side[vehicle] >= 8)).all()
    assert ((short_side[building] >= 24) & (long_side[building] <= 48)).all()
    assert ((w[tank] == h[tank]) & (w[tank] >= 16) & (w[tank] <= 28)).all()


def test_pixels_at_the_boxes_are_the_objects_and_nothing_else_changed() -> None:
    layout = layout_scene(900, 700, seed=21, density=120)
    bare = layout_scene(900, 700, seed=21, density=0)
    assert len(bare) == 0
    pixels = render_window(layout, 0, 0, 900, 700)
    background = render_window(bare, 0, 0, 900, 700)
    changed = object_pixels(pixels, background)
    fractions = np.array([changed[y1:y2, x1:x2].mean() for x1, y1, x2, y2 in layout.boxes.astype(int)])
    # Objects fill their boxes (tanks: a disc, pi/4 of it); a pale roof on a pale field shows least.
    assert fractions.min() >= 0.5 and fractions.mean() >= 0.85, fractions.min()
    outside = ~footprint_mask(layout.boxes, 700, 900)
    np.testing.assert_array_equal(pixels[:, outside], background[:, outside])


def test_class_subset_and_order_set_the_labels() -> None:
    layout = layout_scene(800, 600, seed=4, classes=("tank", "vehicle"), density=100)
    assert layout.classes == ("tank", "vehicle")
    assert set(layout.labels.tolist()) == {0, 1}
    pixels = render_window(layout, 0, 0, 800, 600)
    background = render_window(layout_scene(800, 600, seed=4, density=0), 0, 0, 800, 600)
    changed = object_pixels(pixels, background)
    for (x1, y1, _, _), label in zip(layout.boxes.astype(int), layout.labels, strict=True):
        corner = changed[y1, x1]
        # Label 0 is now the tank: a disc leaves its box's corners as background; a vehicle fills them.
        assert corner == (label == 1), (label, x1, y1)


def test_windows_join_seamlessly() -> None:
    layout = layout_scene(1000, 700, seed=8)
    whole = render_window(layout, 0, 0, 1000, 700)
    pieces = np.zeros_like(whole)
    for y in range(0, 700, 233):
        for x in range(0, 1000, 317):
            w, h = min(317, 1000 - x), min(233, 700 - y)
            pieces[:, y : y + h, x : x + w] = render_window(layout, x, y, w, h)
    np.testing.assert_array_equal(whole, pieces)
    # A window reaching past the scene is nodata (0) there.
    edge = render_window(layout, 900, 600, 200, 200)
    assert (edge[:, 100:, :] == 0).all() and (edge[:, :, 100:] == 0).all()
    assert (edge[:, :100, :100] > 0).all()


def test_sparse_scene_paints_only_its_areas() -> None:
    areas = content_areas(6000, 5000, count=3, size=512, seed=1)
    assert len(areas) == 3 and all(x % 512 == 0 and y % 512 == 0 for x, y, _, _ in areas)
    layout = layout_scene(6000, 5000, seed=2, areas=areas)
    assert len(layout) > 0
    inside = np.zeros(len(layout), bool)
    for ax, ay, aw, ah in areas:
        inside |= (
            (layout.boxes[:, 0] >= ax)
            & (layout.boxes[:, 2] <= ax + aw)
            & (layout.boxes[:, 1] >= ay)
            & (layout.boxes[:, 3] <= ay + ah)
        )
    assert inside.all()
    ax, ay, _, _ = areas[0]
    window = render_window(layout, ax - 100, ay - 100, 300, 300)
    assert (window[:, :100, :] == 0).all() and (window[:, :, :100] == 0).all()
    assert (window[:, 100:, 100:] > 0).all()


def test_density_sets_the_count() -> None:
    few = layout_scene(2048, 2048, seed=1, density=20)
    many = layout_scene(2048, 2048, seed=1, density=120)
    assert abs(len(few) - 20 * 4.194) <= 2
    assert abs(len(many) - 120 * 4.194) <= 5


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"classes": ("vehicle", "ship")}, "scene classes"),
        ({"classes": ()}, "scene classes"),
        ({"density": -1.0}, "density"),
        ({"areas": [(900, 0, 200, 200)]}, "content area"),
    ],
)
def test_bad_requests_say_what_to_fix(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(UserError, match=words):
        layout_scene(1000, 1000, seed=0, **kwargs)  # type: ignore[arg-type]


def test_content_areas_that_cannot_fit_are_refused() -> None:
    with pytest.raises(UserError, match="do not fit"):
        content_areas(1024, 1024, count=5, size=512, seed=0)
