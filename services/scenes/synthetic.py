"""Synthetic aerial scenes with known objects: the data the demo detector learns from and is scored on.

A scene is two things: a *layout* (where every object is, its class, size and look; cheap to compute and
small to hold) and a *renderer* that paints any window of the scene from the layout. The background is a
pure function of the global pixel position and the seed (hashed lattice noise, irregular fields, roads), so
windows painted separately join seamlessly and a huge scene can be written block by block without ever
holding the image. Objects never overlap and lie wholly inside the image (or inside one content area).

Classes (the shapes the renderer knows; a scene may use any subset, in any order):

- ``vehicle``: 12-20 x 8-11 px bright rectangle with a dark windshield stripe near its front;
- ``building``: 24-48 px rectangle with a gabled roof (ridge line, one half shaded) and a cast shadow
  (3 px, below/right of the box: the box holds the roof only);
- ``tank``: 16-28 px pale disc with a dark rim and a centre vent.

This module stays one file (~520 lines): the layout and the renderer share the classes' sizes and looks,
and the position-hashed noise is what lets windows painted apart join, so they are one scene model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.errors import UserError

#: The shapes the renderer can draw; a scene's class list names a subset of these.
SHAPES: tuple[str, ...] = ("vehicle", "building", "tank")
DEFAULT_CLASSES: tuple[str, ...] = SHAPES
#: Objects per megapixel when nothing else is asked (about 21 per 512 x 512 tile).
DEFAULT_DENSITY = 80.0

#: Gap kept free around every object; buildings also reserve their shadow. Keeps centres of neighbours
#: at least 12 px apart, so a stride-4 heatmap never has two peaks in one 3x3 neighbourhood.
_GAP = 2
_SHADOW = 3

_VEHICLE_COLOURS = np.array(
    [[205, 35, 30], [35, 70, 200], [240, 240, 236], [235, 205, 40], [240, 125, 20]], np.float32
)
_ROOF_COLOURS = np.array([[155, 72, 50], [128, 128, 134], [92, 104, 128], [176, 156, 124]], np.float32)
_TANK_COLOURS = np.array([[222, 222, 212], [196, 202, 210], [228, 218, 196]], np.float32)
_FIELD_COLOURS = np.array(
    [
        [72, 112, 52],
        [96, 132, 62],
        [122, 112, 72],
        [142, 126, 92],
        [84, 96, 56],
        [152, 142, 104],
        [108, 120, 80],
        [64, 88, 58],
    ],
    np.float32,
)
_ROAD_COLOUR = np.array([88, 88, 92], np.float32)
_TREE_COLOUR = np.array([38, 62, 34], np.float32)
_ROAD_PERIOD = 1024  # at most one horizontal and one vertical road per 1024 px band
_FIELD_SIZE = 320.0
_STRIP_PIXELS = 1 << 15
_CANDIDATE_CHUNK = 1 << 16
_BUCKET = 64  # larger than any footprint, so a footprint touches at most 2 x 2 buckets


@dataclass(frozen=True)
class SceneLayout:
    """Where every object of a scene is and how it looks; render any window of it with :func:`render_window`.

    ``boxes`` float32 [N, 4] (x1, y1, x2, y2) in scene pixels, x2/y2 exclusive (a 12 px wide object at
    x=100 has x1=100, x2=112); ``labels`` int32 [N] index ``classes``; ``areas`` are the content areas
    (x, y, width, height) of a sparse scene, or ``None`` when the whole scene has content. The remaining
    arrays (one entry per object) only steer the renderer.
    """

    width: int
    height: int
    seed: int
    classes: tuple[str, ...]
    boxes: np.ndarray
    labels: np.ndarray
    colours: np.ndarray  # uint8 [N] index into the shape's palette
    variants: np.ndarray  # uint8 [N] shape-specific flags (front direction, shaded roof half)
    tones: np.ndarray  # float32 [N] brightness factor
    areas: tuple[tuple[int, int, int, int], ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def generate_scene(
    width: int,
    height: int,
    *,
    seed: int,
    classes: Sequence[str] = DEFAULT_CLASSES,
    density: float = DEFAULT_DENSITY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic scene held in memory: (pixels uint8 [3, H, W], boxes float32 [N, 4], labels int32 [N]).

    Deterministic by ``seed``; ``density`` is the number of objects per megapixel (fewer when the image
    is too crowded to place them without overlaps); ``classes`` names the shapes to draw, and label ``i``
    is ``classes[i]``. Boxes are (x1, y1, x2, y2), x2/y2 exclusive.
    """
    layout = layout_scene(width, height, seed=seed, classes=classes, density=density)
    pixels = render_window(layout, 0, 0, width, height)
    return pixels, layout.boxes.copy(), layout.labels.copy()


def layout_scene(
    width: int,
    height: int,
    *,
    seed: int,
    classes: Sequence[str] = DEFAULT_CLASSES,
    density: float = DEFAULT_DENSITY,
    areas: Sequence[tuple[int, int, int, int]] | None = None,
) -> SceneLayout:
    """Place the objects of a scene (no pixels): deterministic by ``seed``, no overlaps, all inside.

    With ``areas`` ((x, y, width, height) rectangles), objects are placed only inside them and the rest of
    the scene is empty (nodata when rendered). Memory is a few arrays per object.
    """
    if width <= 0 or height <= 0:
        raise UserError(f"a scene needs a positive size, got {width} x {height}")
    if density < 0:
        raise UserError(f"density is objects per megapixel and cannot be negative, got {density}")
    class_names = tuple(classes)
    unknown = [c for c in class_names if c not in SHAPES]
    if unknown or not class_names or len(set(class_names)) != len(class_names):
        raise UserError(
            f"scene classes must be distinct names out of {list(SHAPES)}, got {list(class_names)}"
        )
    if areas is None:
        regions: list[tuple[int, int, int, int]] = [(0, 0, width, height)]
    else:
        regions = [_checked_area(a, width, height) for a in areas]
    kinds = np.array([SHAPES.index(c) for c in class_names], np.int64)

    placed: list[tuple[float, float, float, float, int, int, int, float]] = []
    for index, area in enumerate(regions):
        placed.extend(_place(np.random.default_rng([seed, index]), area, density, kinds))

    count = len(placed)
    table = np.array(placed, np.float64).reshape(count, 8)
    return SceneLayout(
        width=width,
        height=height,
        seed=seed,
        classes=class_names,
        boxes=table[:, 0:4].astype(np.float32),
        labels=table[:, 4].astype(np.int32),
        colours=table[:, 5].astype(np.uint8),
        variants=table[:, 6].astype(np.uint8),
        tones=table[:, 7].astype(np.float32),
        areas=None if areas is None else tuple(regions),
    )


def render_window(layout: SceneLayout, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Paint the window (x, y, width, height) of a scene: uint8 [3, height, width].

    Pixels outside the scene's content areas (sparse scenes) and outside the scene are 0, the nodata value;
    painted pixels are never 0. Windows painted separately are identical to the same pixels of one big
    window, so a scene of any size can be written block by block.
    """
    out = np.zeros((3, height, width), np.uint8)
    if width <= 0 or height <= 0:
        return out
    regions = [(0, 0, layout.width, layout.height)] if layout.areas is None else list(layout.areas)
    for ax, ay, aw, ah in regions:
        x1, y1 = max(x, ax), max(y, ay)
        x2, y2 = min(x + width, ax + aw), min(y + height, ay + ah)
        if x1 >= x2 or y1 >= y2:
            continue
        # Paint in strips of ~128k pixels: the float temporaries stay a few MB whatever the window size.
        strip = max(1, _STRIP_PIXELS // (x2 - x1))
        for top in range(y1, y2, strip):
            rows = min(strip, y2 - top)
            out[:, top - y : top - y + rows, x1 - x : x2 - x] = _render_content(
                layout, x1, top, x2 - x1, rows
            )
    return out


def content_areas(
    width: int, height: int, *, count: int, size: int, seed: int, align: int = 512
) -> list[tuple[int, int, int, int]]:
    """``count`` non-overlapping square content areas (x, y, size, size) for a sparse scene.

    Origins are multiples of ``align`` (the file's block size), so only those blocks hold data. Raises
    UserError when the areas cannot fit.
    """
    if size <= 0 or count < 0:
        raise UserError(f"content areas need a positive size and a count >= 0, got size={size} count={count}")
    cells_x = (width - size) // align + 1 if width >= size else 0
    cells_y = (height - size) // align + 1 if height >= size else 0
    rng = np.random.default_rng([seed, 7919])
    chosen: list[tuple[int, int, int, int]] = []
    if cells_x > 0 and cells_y > 0:
        for flat in rng.permutation(cells_x * cells_y)[: max(64 * count, 1024)]:
            ax, ay = int(flat % cells_x) * align, int(flat // cells_x) * align
            if all(
                ax >= bx + size or bx >= ax + size or ay >= by + size or by >= ay + size
                for bx, by, _, _ in chosen
            ):
                chosen.append((ax, ay, size, size))
            if len(chosen) == count:
                break
    if len(chosen) < count:
        raise UserError(f"{count} content areas of {size} px do not fit in a {width} x {height} scene")
    return sorted(chosen, key=lambda a: (a[1], a[0]))


# --- layout -----------------------------------------------------------------------------------------


def _checked_area(area: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    ax, ay, aw, ah = (int(v) for v in area)
    if aw <= 0 or ah <= 0 or ax < 0 or ay < 0 or ax + aw > width or ay + ah > height:
        raise UserError(
            f"content area {area} (x, y, width, height) must lie inside the {width} x {height} scene"
        )
    return ax, ay, aw, ah


def _place(
    rng: np.random.Generator, area: tuple[int, int, int, int], density: float, kinds: np.ndarray
) -> list[tuple[float, float, float, float, int, int, int, float]]:
    """Rejection-sample non-overlapping objects in one area; a coarse bucket grid keeps checks local."""
    placement = _Placement(area, kinds, target=round(density * area[2] * area[3] / 1e6))
    tries = 4 * placement.target + 16 if placement.target else 0
    # Candidates are drawn in chunks so that a huge scene never holds all of its tries at once.
    for start in range(0, tries, _CANDIDATE_CHUNK):
        placement.try_candidates(rng, min(_CANDIDATE_CHUNK, tries - start))
        if placement.done:
            break
    return placement.placed


@dataclass
class _Placement:
    """Objects placed so far in one area, and a bucket grid of their footprints for the overlap checks."""

    area: tuple[int, int, int, int]
    kinds: np.ndarray
    target: int
    grid: dict[tuple[int, int], list[tuple[int, int, int, int]]] = field(default_factory=dict)
    placed: list[tuple[float, float, float, float, int, int, int, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.placed) >= self.target

    def try_candidates(self, rng: np.random.Generator, tries: int) -> None:
        """Draw ``tries`` candidates and keep, in order, those that fit, until the target is reached."""
        ax, ay, aw, ah = self.area
        kinds, grid, bucket = self.kinds, self.grid, _BUCKET
        labels = rng.integers(0, len(kinds), tries)
        shape = kinds[labels]
        long_side = rng.integers(12, 21, tries)
        short_side = rng.integers(8, 12, tries)
        building_w, building_h = rng.integers(24, 49, tries), rng.integers(24, 49, tries)
        tank_d = rng.integers(16, 29, tries)
        upright = rng.integers(0, 2, tries)
        unit_x, unit_y = rng.random(tries), rng.random(tries)
        colours = rng.integers(0, 256, tries)
        variants = rng.integers(0, 256, tries)
        tones = rng.uniform(0.85, 1.1, tries)

        for i in range(tries):
            kind = int(shape[i])
            if kind == 0:
                w, h = (
                    (int(short_side[i]), int(long_side[i]))
                    if upright[i]
                    else (int(long_side[i]), int(short_side[i]))
                )
            elif kind == 1:
                w, h = int(building_w[i]), int(building_h[i])
            else:
                w = h = int(tank_d[i])
            extra = _SHADOW if kind == 1 else 0
            if w + extra > aw or h + extra > ah:
                continue
            x1 = ax + int(unit_x[i] * (aw - w - extra + 1))
            y1 = ay + int(unit_y[i] * (ah - h - extra + 1))
            fx1, fy1, fx2, fy2 = x1 - _GAP, y1 - _GAP, x1 + w + extra + _GAP, y1 + h + extra + _GAP
            keys = [
                (bx, by)
                for by in range(fy1 // bucket, (fy2 - 1) // bucket + 1)
                for bx in range(fx1 // bucket, (fx2 - 1) // bucket + 1)
            ]
            clash = any(
                fx1 < ox2 and ox1 < fx2 and fy1 < oy2 and oy1 < fy2
                for key in keys
                for ox1, oy1, ox2, oy2 in grid.get(key, ())
            )
            if clash:
                continue
            for key in keys:
                grid.setdefault(key, []).append((fx1, fy1, fx2, fy2))
            palette = (len(_VEHICLE_COLOURS), len(_ROOF_COLOURS), len(_TANK_COLOURS))[kind]
            colour = int(colours[i]) % palette
            self.placed.append(
                (x1, y1, x1 + w, y1 + h, int(labels[i]), colour, int(variants[i]), float(tones[i]))
            )
            if self.done:
                return


# --- rendering --------------------------------------------------------------------------------------


def _render_content(layout: SceneLayout, x: int, y: int, width: int, height: int) -> np.ndarray:
    xs = np.arange(x, x + width, dtype=np.int64)
    ys = np.arange(y, y + height, dtype=np.int64)
    image = _background(layout.seed, xs, ys)
    _draw_objects(image, layout, x, y)
    # Fine grain over everything (objects included): no object is a flat, perfectly uniform patch.
    image *= (0.94 + 0.12 * _value_noise(xs, ys, 2.0, _salt(layout.seed, 11)))[None]
    return np.clip(image + 0.5, 1, 255).astype(np.uint8)


def _background(seed: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Irregular fields with crop-row stripes, tree clumps, brightness noise and roads: float32 [3, h, w]."""
    fxs, fys = xs.astype(np.float32), ys.astype(np.float32)
    # Fields: a hashed grid, its cell edges warped by low-frequency noise so that patches look irregular.
    warp_x = _value_noise(xs, ys, 192.0, _salt(seed, 1))
    warp_y = _value_noise(xs, ys, 192.0, _salt(seed, 2))
    field_x = np.floor((fxs[None, :] + 160.0 * warp_x) * (1.0 / _FIELD_SIZE)).astype(np.int32)
    field_y = np.floor((fys[:, None] + 160.0 * warp_y) * (1.0 / _FIELD_SIZE)).astype(np.int32)
    # Hash only the few distinct field cells of this window, then look them up per pixel.
    x0, y0 = int(field_x.min()), int(field_y.min())
    cells = _hash(
        np.arange(x0, int(field_x.max()) + 1)[None, :],
        np.arange(y0, int(field_y.max()) + 1)[:, None],
        _salt(seed, 3),
    )
    field = cells[field_y - y0, field_x - x0]
    image = _FIELD_COLOURS.T[:, (field % np.uint32(len(_FIELD_COLOURS))).astype(np.intp)]

    # Crop rows: a stripe pattern per field, horizontal or vertical, period 6-11 px, a third of fields plain.
    inverse_period = 1.0 / (6 + (field >> np.uint32(8)) % np.uint32(6)).astype(np.float32)
    along = np.where((field >> np.uint32(4)) & np.uint32(1), fys[:, None], fxs[None, :])
    phase = along * inverse_period
    stripes = (phase - np.floor(phase)) < 0.5
    strength = np.where((field >> np.uint32(12)) % np.uint32(3) == 0, np.float32(0.0), np.float32(0.08))
    shade = 1.0 - strength * stripes

    # Fractal value noise: large soft patches plus medium texture.
    shade *= (
        0.8
        + 0.25 * _value_noise(xs, ys, 96.0, _salt(seed, 4))
        + 0.15 * _value_noise(xs, ys, 12.0, _salt(seed, 5))
    )
    image *= shade[None]

    # Tree clumps in some places: dark irregular blobs, clutter the detector must learn to ignore.
    trees = (_value_noise(xs, ys, 7.0, _salt(seed, 9)) > 0.72) & (
        _value_noise(xs, ys, 160.0, _salt(seed, 10)) > 0.6
    )
    if trees.any():
        image = np.where(trees[None], _TREE_COLOUR[:, None, None] * shade[None], image)

    road = _road_mask(ys, _salt(seed, 6))[:, None] | _road_mask(xs, _salt(seed, 7))[None, :]
    if road.any():
        asphalt = (
            _ROAD_COLOUR[:, None, None] * (0.92 + 0.16 * _value_noise(xs, ys, 6.0, _salt(seed, 8)))[None]
        )
        image = np.where(road[None], asphalt, image)
    return image.astype(np.float32, copy=False)


def _road_mask(coords: np.ndarray, salt: int) -> np.ndarray:
    """Pixels of one axis on a road: per 1024 px band, two bands in three carry a 7-11 px wide road."""
    band = coords // _ROAD_PERIOD
    h = _hash(band, np.zeros_like(band), salt)
    centre = band * _ROAD_PERIOD + 96 + (h % np.uint32(_ROAD_PERIOD - 192)).astype(np.int64)
    half = 3 + ((h >> np.uint32(12)) % np.uint32(3)).astype(np.int64)
    return ((h >> np.uint32(20)) % np.uint32(3) != 0) & (np.abs(coords - centre) <= half)


@dataclass(frozen=True)
class _Canvas:
    """A painted window: float32 [3, h, w] pixels whose top-left pixel is scene pixel (x, y)."""

    image: np.ndarray
    x: int
    y: int

    def cut(self, rect: tuple[int, int, int, int]) -> tuple[slice, slice] | None:
        """The slices of the scene rectangle (x1, y1, x2, y2), clipped; None when it misses the window."""
        height, width = self.image.shape[1:]
        x1, y1, x2, y2 = rect
        a, b = max(x1 - self.x, 0), min(x2 - self.x, width)
        c, d = max(y1 - self.y, 0), min(y2 - self.y, height)
        if a >= b or c >= d:
            return None
        return slice(c, d), slice(a, b)

    def fill(self, rect: tuple[int, int, int, int], colour: np.ndarray) -> None:
        """Paint the scene rectangle (x1, y1, x2, y2) in one colour, where it meets the window."""
        cut = self.cut(rect)
        if cut is not None:
            self.image[:, cut[0], cut[1]] = colour[:, None, None]


def _draw_objects(image: np.ndarray, layout: SceneLayout, x: int, y: int) -> None:
    height, width = image.shape[1:]
    boxes = layout.boxes
    # Footprints reach _SHADOW px past the box (building shadows).
    hit = (
        (boxes[:, 0] < x + width)
        & (boxes[:, 2] + _SHADOW > x)
        & (boxes[:, 1] < y + height)
        & (boxes[:, 3] + _SHADOW > y)
    )
    canvas = _Canvas(image, x, y)
    kinds = [SHAPES.index(c) for c in layout.classes]
    for i in np.flatnonzero(hit):
        x1, y1, x2, y2 = (int(v) for v in boxes[i])
        box = (x1, y1, x2, y2)
        kind = kinds[int(layout.labels[i])]
        tone = float(layout.tones[i])
        variant = int(layout.variants[i])
        colour = int(layout.colours[i])
        if kind == 0:
            _draw_vehicle(canvas, box, _VEHICLE_COLOURS[colour] * tone, variant)
        elif kind == 1:
            _draw_building(canvas, box, _ROOF_COLOURS[colour] * tone, variant)
        else:
            _draw_tank(canvas, box, _TANK_COLOURS[colour] * tone)


def _draw_vehicle(canvas: _Canvas, box: tuple[int, int, int, int], colour: np.ndarray, variant: int) -> None:
    x1, y1, x2, y2 = box
    canvas.fill(box, colour)
    glass = np.array([28, 32, 40], np.float32)
    forward = variant & 1
    if x2 - x1 >= y2 - y1:  # lying: the windshield crosses the width, a quarter in from the front
        length = x2 - x1
        at = x1 + length // 4 if forward else x2 - length // 4 - 3
        canvas.fill((at, y1 + 1, at + 3, y2 - 1), glass)
    else:
        length = y2 - y1
        at = y1 + length // 4 if forward else y2 - length // 4 - 3
        canvas.fill((x1 + 1, at, x2 - 1, at + 3), glass)


def _draw_building(canvas: _Canvas, box: tuple[int, int, int, int], colour: np.ndarray, variant: int) -> None:
    x1, y1, x2, y2 = box
    shadow = canvas.cut((x1 + _SHADOW, y1 + _SHADOW, x2 + _SHADOW, y2 + _SHADOW))
    if shadow is not None:
        canvas.image[:, shadow[0], shadow[1]] *= 0.45
    canvas.fill(box, colour)
    dark = colour * 0.78
    ridge = np.minimum(colour * 1.25 + 20, 255)
    shaded_first = variant & 2
    if x2 - x1 >= y2 - y1:  # ridge runs along the long side
        mid = (y1 + y2) // 2
        canvas.fill((x1, y1, x2, mid) if shaded_first else (x1, mid, x2, y2), dark)
        canvas.fill((x1, mid - 1, x2, mid + 1), ridge)
    else:
        mid = (x1 + x2) // 2
        canvas.fill((x1, y1, mid, y2) if shaded_first else (mid, y1, x2, y2), dark)
        canvas.fill((mid - 1, y1, mid + 1, y2), ridge)


def _draw_tank(canvas: _Canvas, box: tuple[int, int, int, int], colour: np.ndarray) -> None:
    cut = canvas.cut(box)
    if cut is None:
        return
    x1, y1, x2, y2 = box
    rows, cols = cut
    centre_x, centre_y, radius = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    yy = (np.arange(rows.start, rows.stop) + canvas.y + 0.5 - centre_y)[:, None]
    xx = (np.arange(cols.start, cols.stop) + canvas.x + 0.5 - centre_x)[None, :]
    distance = np.sqrt(xx * xx + yy * yy)
    patch = canvas.image[:, rows, cols]
    rim = np.array([96, 98, 102], np.float32)
    patch[:] = np.where(distance <= radius, rim[:, None, None], patch)
    patch[:] = np.where(distance <= radius - 2, colour[:, None, None], patch)
    patch[:] = np.where(distance <= min(2.5, radius / 5), (colour * 0.6)[:, None, None], patch)


# --- position-hashed noise --------------------------------------------------------------------------


def _salt(seed: int, purpose: int) -> int:
    return (seed * 0x9E3779B1 + purpose * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF


def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed uint32 per integer lattice point (murmur3-style finaliser)."""
    h = (ix.astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (iy.astype(np.uint32) * np.uint32(0xD8163841))
    h ^= np.uint32(salt)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _value_noise(xs: np.ndarray, ys: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] on the global grid, float32 [len(ys), len(xs)]."""
    gx, gy = xs / cell, ys / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    lx = np.arange(ix.min(), ix.max() + 2)
    ly = np.arange(iy.min(), iy.max() + 2)
    lattice = (_hash(lx[None, :], ly[:, None], salt) >> np.uint32(8)).astype(np.float32) / float(1 << 24)
    cx, cy = ix - lx[0], iy - ly[0]
    rows = lattice[:, cx] * (1 - sx) + lattice[:, cx + 1] * sx
    return rows[cy] * (1 - sy)[:, None] + rows[cy + 1] * sy[:, None]
