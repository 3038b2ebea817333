"""Generated "photos" of landmarks, so the catalog's demos and tests download nothing.

Six landmarks (:data:`LANDMARKS`), each with a silhouette and colours of its own: a lattice ``tower``, a
triumphal ``arch``, a ``dome`` on a drum, a two-faced ``pyramid``, a ferris ``wheel`` and a suspension
``bridge``. A photo (:func:`draw_photo`) shows one of them, sometimes two side by side, large, at a seeded
position and scale, in a scene: a sky gradient of a time of day, ground, a far skyline, clouds and trees
(always behind the landmarks, so a box is never occluded), then lighting, a colour cast and noise; it is
encoded as JPEG (a seeded quality) or PNG. Each landmark's box (``x0, y0, x1, y1``, pixels, the ends
exclusive) is the bounding box of the pixels its drawing covers, so it is tight by construction.

Everything follows the seed: :func:`plan_photo` draws every choice first, :func:`render_photo` paints a plan
(optionally leaving landmarks out, which is how the tests prove the boxes tight). :func:`exif_oriented_jpeg`
stores an image turned, with the EXIF orientation that turns it back; :func:`write_scenes` writes photos as
the trainer's detector dataset (``services/trainer/tasks/detector.py``).

This module stays one file (~540 lines): the plan, the painting and the six landmark painters are one seeded
drawing, and a landmark's box is the bounding box of the pixels its painter covers, so the painters and the
boxes they promise change together.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from services.errors import UserError

#: The landmarks a photo can show.
LANDMARKS: tuple[str, ...] = ("tower", "arch", "dome", "pyramid", "wheel", "bridge")
#: Width / height of each landmark's drawing.
ASPECT: dict[str, float] = {
    "tower": 0.5,
    "arch": 1.15,
    "dome": 0.85,
    "pyramid": 1.7,
    "wheel": 0.9,
    "bridge": 2.4,
}
#: The default photo size: larger than the detector's 256-pixel training crops on both sides.
SIZE = (384, 288)
_SUPERSAMPLE = 2
RGB = tuple[int, int, int]
_PALETTES: dict[str, tuple[RGB, ...]] = {
    "tower": ((92, 74, 60), (60, 56, 52)),
    "arch": ((222, 208, 170), (120, 104, 80)),
    "dome": ((236, 234, 226), (66, 150, 128), (200, 160, 60)),
    "pyramid": ((214, 176, 104), (150, 116, 62)),
    "wheel": ((222, 40, 52), (246, 246, 246), (70, 70, 80)),
    "bridge": ((194, 56, 42), (140, 36, 30)),
}
_SKIES: tuple[tuple[RGB, RGB], ...] = (
    ((70, 130, 200), (172, 206, 236)),  # day
    ((110, 160, 220), (232, 220, 200)),  # morning
    ((58, 60, 118), (238, 150, 92)),  # dusk
    ((138, 144, 150), (204, 204, 204)),  # overcast
)
_GROUNDS: tuple[RGB, ...] = ((82, 122, 62), (122, 122, 116), (186, 168, 122), (54, 92, 130))


@dataclass(frozen=True)
class Placement:
    """Where a landmark is drawn: its drawing's top-left corner and size, colours and light (-1: sun on the
    left, 1: on the right)."""

    kind: str
    x: int
    y: int
    width: int
    height: int
    colours: tuple[RGB, ...]
    light: float


@dataclass(frozen=True)
class PhotoPlan:
    """Every choice of a photo, drawn from its seed."""

    seed: int
    size: tuple[int, int]
    sky: tuple[RGB, RGB]
    ground: RGB
    horizon: int
    skyline: tuple[tuple[int, int, int, int, int], ...]
    clouds: tuple[tuple[int, int, int, int], ...]
    trees: tuple[tuple[int, int, int], ...]
    placements: tuple[Placement, ...]
    brightness: float
    contrast: float
    cast: tuple[float, float, float]
    noise: float
    blur: float
    quality: int


@dataclass(frozen=True)
class Landmark:
    """A landmark in a photo and its box (pixels; x1 and y1 exclusive)."""

    kind: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Photo:
    """A rendered photo, its landmarks and the plan it was drawn from."""

    image: Image.Image
    landmarks: tuple[Landmark, ...]
    plan: PhotoPlan

    def jpeg(self, quality: int | None = None) -> bytes:
        """The photo as JPEG bytes (at the plan's quality unless ``quality`` is given)."""
        out = io.BytesIO()
        self.image.save(out, "JPEG", quality=quality or self.plan.quality)
        return out.getvalue()

    def png(self) -> bytes:
        """The photo as PNG bytes (lossless)."""
        out = io.BytesIO()
        self.image.save(out, "PNG")
        return out.getvalue()


def plan_photo(
    seed: int,
    *,
    kinds: Sequence[str] = LANDMARKS,
    main: str | None = None,
    size: tuple[int, int] = SIZE,
    second: float = 0.2,
) -> PhotoPlan:
    """The choices of photo ``seed``: ``main`` (else one of ``kinds``) and, with probability ``second``,
    another of ``kinds`` beside it. UserError for an unknown landmark or a photo under 64 pixels a side."""
    unknown = sorted({*kinds, *([main] if main else [])} - set(LANDMARKS))
    if unknown or not kinds:
        raise UserError(f"photos show {', '.join(LANDMARKS)}; not {', '.join(unknown) or 'nothing'}")
    width, height = size
    if width < 64 or height < 64:
        raise UserError(f"photos are at least 64 x 64 pixels, not {width} x {height}")
    rng = random.Random(seed)
    top, low = rng.choice(_SKIES)
    sky = (_jitter(rng, top, 12), _jitter(rng, low, 12))
    ground = _jitter(rng, rng.choice(_GROUNDS), 14)
    horizon = int(height * rng.uniform(0.58, 0.8))
    skyline = tuple(
        (
            int(rng.uniform(0, width)),
            int(rng.uniform(8, 34) * width / 384),
            int(rng.uniform(0.04, 0.22) * height),
            int(rng.uniform(0.35, 0.7) * 100),
            rng.randrange(3),
        )
        for _ in range(rng.randint(0, 14))
    )
    clouds = tuple(
        (
            int(rng.uniform(0, width)),
            int(rng.uniform(0.02, 0.45) * height),
            int(rng.uniform(0.08, 0.25) * width),
            int(rng.uniform(0.03, 0.08) * height),
        )
        for _ in range(rng.randint(0, 5))
    )
    trees = tuple(
        (int(rng.uniform(0, width)), int(rng.uniform(horizon, horizon + 0.06 * height)), rng.randint(5, 14))
        for _ in range(rng.randint(0, 7))
    )
    first = main or rng.choice(list(kinds))
    chosen = [first]
    others = [k for k in kinds if k != first]
    if others and rng.random() < second:
        chosen.append(rng.choice(others))
        rng.shuffle(chosen)
    slot = width / len(chosen)
    placements = tuple(
        _place(rng, kind, int(i * slot), int(slot), height=height, horizon=horizon)
        for i, kind in enumerate(chosen)
    )
    return PhotoPlan(
        seed=seed,
        size=(width, height),
        sky=sky,
        ground=ground,
        horizon=horizon,
        skyline=skyline,
        clouds=clouds,
        trees=trees,
        placements=placements,
        brightness=rng.uniform(0.78, 1.18),
        contrast=rng.uniform(0.82, 1.15),
        cast=(rng.uniform(0.92, 1.08), rng.uniform(0.95, 1.05), rng.uniform(0.92, 1.08)),
        noise=rng.uniform(1.5, 7.0),
        blur=rng.choice((0.0, 0.0, 0.0, 0.6)),
        quality=rng.randint(65, 92),
    )


def _place(rng: random.Random, kind: str, left: int, slot: int, *, height: int, horizon: int) -> Placement:
    base = int(rng.uniform(horizon + 0.02 * height, 0.97 * height))
    tall = rng.uniform(0.42, 0.82) * height
    tall = min(tall, base - 0.04 * height, 0.92 * slot / ASPECT[kind])
    box_h = max(int(tall), 16)
    box_w = max(int(box_h * ASPECT[kind]), 8)
    margin = max(int(0.03 * slot), 1)
    x = left + int(rng.uniform(margin, max(margin, slot - box_w - margin)))
    colours = tuple(_jitter(rng, c, 16) for c in _PALETTES[kind])
    if kind == "dome" and rng.random() < 0.5:  # a gilded dome instead of a copper one
        colours = (colours[0], colours[2], colours[1])
    return Placement(
        kind, x, base - box_h, box_w, box_h, colours, rng.choice((-1.0, 1.0)) * rng.uniform(0.4, 1)
    )


def _jitter(rng: random.Random, colour: RGB, spread: int) -> RGB:
    r, g, b = (min(255, max(0, c + rng.randint(-spread, spread))) for c in colour)
    return (r, g, b)


def render_photo(
    plan: PhotoPlan, *, show: Collection[int] | None = None
) -> tuple[Image.Image, list[Landmark]]:
    """Paint ``plan``: the RGB image and the boxes of the landmarks shown (all, or the placements whose
    indices are in ``show``). The same plan paints the same pixels; leaving a landmark out changes only
    the pixels inside its box."""
    width, height = plan.size
    canvas = Image.fromarray(_background(plan)).convert("RGBA")
    _clutter(canvas, plan)
    landmarks: list[Landmark] = []
    for index, placement in enumerate(plan.placements):
        if show is not None and index not in show:
            continue
        layer = _landmark_layer(placement)
        bbox = layer.getchannel("A").getbbox()
        if bbox is None:
            continue
        canvas.alpha_composite(layer, (placement.x, placement.y))
        x0, y0, x1, y1 = bbox
        box = (placement.x + x0, placement.y + y0, placement.x + x1, placement.y + y1)
        inside = (max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height))
        landmarks.append(Landmark(placement.kind, inside))
    pixels = np.asarray(canvas.convert("RGB"), dtype=np.float32)
    pixels = (pixels * plan.brightness - 128.0) * plan.contrast + 128.0
    pixels *= np.asarray(plan.cast, dtype=np.float32)
    pixels += np.random.default_rng([plan.seed, 7]).normal(0.0, plan.noise, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if plan.blur:
        image = image.filter(ImageFilter.GaussianBlur(plan.blur))
    return image, landmarks


def draw_photo(
    seed: int,
    *,
    kinds: Sequence[str] = LANDMARKS,
    main: str | None = None,
    size: tuple[int, int] = SIZE,
    second: float = 0.2,
) -> Photo:
    """Photo ``seed`` (see :func:`plan_photo` for the arguments), rendered."""
    plan = plan_photo(seed, kinds=kinds, main=main, size=size, second=second)
    image, landmarks = render_photo(plan)
    return Photo(image, tuple(landmarks), plan)


def draw_photos(
    seed: int,
    count: int,
    *,
    kinds: Sequence[str] = LANDMARKS,
    size: tuple[int, int] = SIZE,
    second: float = 0.2,
) -> list[Photo]:
    """``count`` photos, the landmarks of ``kinds`` taking turns as the main one (seeds ``seed``,
    ``seed + 1``, ...)."""
    return [
        draw_photo(seed + i, kinds=kinds, main=kinds[i % len(kinds)], size=size, second=second)
        for i in range(count)
    ]


_INVERSE_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_oriented_jpeg(image: Image.Image, orientation: int = 6, *, quality: int = 95) -> bytes:
    """JPEG bytes whose pixels are ``image`` turned (or mirrored) and whose EXIF orientation tag says how
    to turn them back: a viewer that honours the tag shows ``image`` upright, one that does not shows it on
    its side. ``orientation`` is 2..8 (6: the camera was turned 90 degrees clockwise)."""
    if orientation not in _INVERSE_ORIENTATION:
        raise UserError(f"an EXIF orientation to set is 2..8, not {orientation!r}")
    stored = image.convert("RGB").transpose(_INVERSE_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def write_scenes(folder: Path, photos: Iterable[Photo], classes: Sequence[str] | None = None) -> Path:
    """Write ``photos`` as the detector task's dataset: ``classes.json``, ``<name>.png`` and ``<name>.json``
    with boxes and labels per photo. ``classes`` defaults to the landmarks the photos show, in
    :data:`LANDMARKS` order."""
    listed = list(photos)
    names = (
        list(classes)
        if classes
        else [k for k in LANDMARKS if any(k == m.kind for p in listed for m in p.landmarks)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps(names))
    for index, photo in enumerate(listed):
        shown = [m for m in photo.landmarks if m.kind in names]
        stem = f"photo-{index:05d}-{photo.plan.seed}"
        photo.image.save(folder / f"{stem}.png")
        labels = {"boxes": [list(m.box) for m in shown], "labels": [m.kind for m in shown]}
        (folder / f"{stem}.json").write_text(json.dumps(labels))
    return folder


# --- painting -----------------------------------------------------------------------------------------------


def _background(plan: PhotoPlan) -> np.ndarray:
    width, height = plan.size
    top, low = (np.asarray(c, dtype=np.float32) for c in plan.sky)
    t = np.linspace(0.0, 1.0, plan.horizon, dtype=np.float32)[:, None]
    sky = top * (1 - t) + low * t
    ground = np.asarray(plan.ground, dtype=np.float32)
    g = np.linspace(0.0, 1.0, height - plan.horizon, dtype=np.float32)[:, None]
    earth = ground * (1.05 - 0.35 * g)
    rows = np.concatenate([sky, earth], axis=0)
    return np.clip(np.repeat(rows[:, None, :], width, axis=1), 0, 255).astype(np.uint8)


def _clutter(canvas: Image.Image, plan: PhotoPlan) -> None:
    low = np.asarray(plan.sky[1], dtype=np.float32)
    draw = ImageDraw.Draw(canvas)
    for x, w, h, grey, roof in plan.skyline:
        tone = low * (1 - grey / 100) + np.asarray((96, 104, 118)) * (grey / 100)
        colour = (*(int(c) for c in tone), 255)
        draw.rectangle((x, plan.horizon - h, x + w, plan.horizon), fill=colour)
        if roof == 1:
            draw.polygon(
                [(x, plan.horizon - h), (x + w, plan.horizon - h), (x + w // 2, plan.horizon - h - w // 2)],
                fill=colour,
            )
    if plan.clouds:
        clouds = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        cloud_draw = ImageDraw.Draw(clouds)
        for x, y, w, h in plan.clouds:
            cloud_draw.ellipse((x - w, y - h, x + w, y + h), fill=(250, 250, 250, 170))
            cloud_draw.ellipse((x - w // 2, y - 2 * h, x + w // 3, y + h // 2), fill=(250, 250, 250, 150))
        canvas.alpha_composite(clouds.filter(ImageFilter.GaussianBlur(4)))
    for x, y, r in plan.trees:
        draw.rectangle((x - max(r // 5, 1), y - r, x + max(r // 5, 1), y), fill=(70, 50, 36, 255))
        draw.ellipse((x - r, y - 3 * r, x + r, y - r // 2), fill=(34, 78, 40, 255))


def _landmark_layer(placement: Placement) -> Image.Image:
    s = _SUPERSAMPLE
    big = Image.new("RGBA", (placement.width * s, placement.height * s), (0, 0, 0, 0))
    _PAINTERS[placement.kind](ImageDraw.Draw(big), big.width, big.height, placement)
    return big.resize((placement.width, placement.height), Image.Resampling.BOX)


def _shade(colour: RGB, factor: float) -> tuple[int, int, int, int]:
    r, g, b = (min(255, max(0, int(c * factor))) for c in colour)
    return (r, g, b, 255)


_CLEAR = (0, 0, 0, 0)


def _tower(draw: ImageDraw.ImageDraw, w: int, h: int, p: Placement) -> None:
    body, dark = p.colours
    cx = w / 2

    def half(y: float) -> float:
        return max(0.5 * w * (y / h) ** 1.7, 0.035 * w)

    steps = [h * i / 24 for i in range(25)]
    right = [(cx + half(y), y) for y in steps[1:]]
    left = [(cx - half(y), y) for y in reversed(steps[1:])]
    draw.polygon([(cx, 0), *right, *left], fill=_shade(body, 1.0))
    for i in range(3, 23, 2):  # the lattice
        y0, y1 = steps[i], steps[i + 2]
        draw.line(
            [(cx - half(y1) * 0.9, y1), (cx + half(y0) * 0.9, y0)],
            fill=_shade(dark, 0.9),
            width=max(w // 60, 1),
        )
        draw.line(
            [(cx + half(y1) * 0.9, y1), (cx - half(y0) * 0.9, y0)],
            fill=_shade(dark, 0.9),
            width=max(w // 60, 1),
        )
    for frac in (0.38, 0.64):  # the platforms
        y = h * frac
        draw.rectangle(
            (cx - half(y) * 1.12, y - 0.02 * h, cx + half(y) * 1.12, y + 0.012 * h), fill=_shade(dark, 1.0)
        )
    draw.ellipse((cx - 0.3 * w, h - 0.24 * h, cx + 0.3 * w, h + 0.24 * h), fill=_CLEAR)  # between the legs


def _arch(draw: ImageDraw.ImageDraw, w: int, h: int, p: Placement) -> None:
    stone, relief = p.colours
    lit, shaded = (1.0, 0.86) if p.light > 0 else (0.86, 1.0)
    draw.rectangle((0, 0.1 * h, w / 2, h), fill=_shade(stone, shaded))
    draw.rectangle((w / 2, 0.1 * h, w, h), fill=_shade(stone, lit))
    draw.rectangle((0.02 * w, 0, 0.98 * w, 0.1 * h), fill=_shade(stone, 0.93))
    draw.rectangle((0, 0.1 * h, w, 0.135 * h), fill=_shade(relief, 1.0))
    draw.rectangle((0, 0.3 * h, w, 0.33 * h), fill=_shade(relief, 1.1))
    for x0 in (0.07, 0.75):
        draw.rectangle((x0 * w, 0.42 * h, (x0 + 0.18) * w, 0.78 * h), fill=_shade(relief, 1.2))
    draw.rectangle((0.33 * w, 0.56 * h, 0.67 * w, h), fill=_CLEAR)
    draw.ellipse((0.33 * w, 0.39 * h, 0.67 * w, 0.73 * h), fill=_CLEAR)


def _dome(draw: ImageDraw.ImageDraw, w: int, h: int, p: Placement) -> None:
    walls, roof, _ = p.colours
    draw.rectangle((0, 0.74 * h, w, h), fill=_shade(walls, 0.95))
    for i in range(1, 16):
        x = w * i / 16
        draw.line([(x, 0.78 * h), (x, h)], fill=_shade(walls, 0.7), width=max(w // 90, 1))
    draw.rectangle((0.18 * w, 0.5 * h, 0.82 * w, 0.75 * h), fill=_shade(walls, 1.0))
    for i in range(1, 10):
        x = 0.18 * w + 0.64 * w * i / 10
        draw.line([(x, 0.53 * h), (x, 0.74 * h)], fill=_shade(walls, 0.72), width=max(w // 80, 1))
    box = (0.14 * w, 0.17 * h, 0.86 * w, 0.83 * h)
    draw.pieslice(box, 180, 360, fill=_shade(roof, 1.0))
    draw.pieslice(box, 270, 360, fill=_shade(roof, 0.78 if p.light < 0 else 1.15))
    for angle in (200, 225, 250, 290, 315, 340):
        rad = np.deg2rad(angle)
        edge = (w / 2 + 0.36 * w * np.cos(rad), 0.5 * h + 0.33 * h * np.sin(rad))
        draw.line([(w / 2, 0.17 * h), edge], fill=_shade(roof, 0.65), width=max(w // 100, 1))
    draw.rectangle((0.45 * w, 0.07 * h, 0.55 * w, 0.19 * h), fill=_shade(walls, 0.9))
    draw.ellipse((0.47 * w, 0, 0.53 * w, 0.08 * h), fill=_shade(roof, 0.8))


def _pyramid(draw: ImageDraw.ImageDraw, w: int, h: int, p: Placement) -> None:
    sand, line = p.colours
    apex = (0.5 * w, 0.0)
    ridge = 0.62 * w if p.light > 0 else 0.38 * w
    lit_left = p.light < 0
    draw.polygon([(0, h), apex, (ridge, h)], fill=_shade(sand, 1.08 if lit_left else 0.72))
    draw.polygon([(ridge, h), apex, (w, h)], fill=_shade(sand, 0.72 if lit_left else 1.08))
    for i in range(1, 12):
        y = h * i / 12
        half = 0.5 * w * y / h
        draw.line([(w / 2 - half, y), (w / 2 + half, y)], fill=_shade(line, 1.0), width=max(h // 120, 1))


def _wheel(draw: ImageDraw.ImageDraw, w: int, h: int, p: Placement) -> None:
    rim, spokes, frame = p.colours
    r = w / 2
    cx, cy = r, r
    leg = max(w // 28, 2)
    draw.line([(cx, cy), (0.14 * w, h)], fill=_shade(frame, 1.0), width=leg)
    draw.line([(cx, cy), (0.86 * w, h)], fill=_shade(frame, 1.0), width=leg)
    draw.rectangle((0.06 * w, h - 0.035 * h, 0.94 * w, h), fill=_shade(frame, 0.9))
    for i in range(16):
        a = 2 * np.pi * i / 16
        draw.line(
            [(cx, cy), (cx + 0.92 * r * np.cos(a), cy + 0.92 * r * np.sin(a))],
            fill=_shade(spokes, 1.0),
            width=max(w // 70, 1),
        )
    ring = max(w // 22, 2)
    draw.ellipse(
        (0.06 * r, 0.06 * r, 2 * r - 0.06 * r, 2 * r - 0.06 * r), outline=_shade(rim, 1.0), width=ring
    )
    draw.ellipse(
        (0.22 * r, 0.22 * r, 2 * r - 0.22 * r, 2 * r - 0.22 * r), outline=_shade(rim, 0.8), width=ring // 2
    )
    for i in range(16):
        a = 2 * np.pi * (i + 0.5) / 16
        gx, gy = cx + 0.94 * r * np.cos(a), cy + 0.94 * r * np.sin(a)
        g = 0.06 * r
        draw.ellipse((gx - g, gy - g, gx + g, gy + g), fill=_shade(spokes if i % 2 else frame, 1.0))
    draw.ellipse((cx - 0.1 * r, cy - 0.1 * r, cx + 0.1 * r, cy + 0.1 * r), fill=_shade(frame, 1.0))


def _bridge(draw: ImageDraw.ImageDraw, w: int, h: int, p: Placement) -> None:
    steel, dark = p.colours
    deck_top, deck_bottom = 0.6 * h, 0.7 * h
    towers = (0.24 * w, 0.76 * w)
    cable = max(int(0.012 * w), 2)

    def sag(x: float) -> float:  # the main cable between the towers
        t = (x - towers[0]) / (towers[1] - towers[0])
        return 0.04 * h + (deck_top - 0.06 * h) * 4 * t * (1 - t)

    for i in range(1, 40):
        x = towers[0] + (towers[1] - towers[0]) * i / 40
        draw.line([(x, sag(x)), (x, deck_top)], fill=_shade(dark, 1.0), width=max(cable // 3, 1))
    main = [(towers[0] + (towers[1] - towers[0]) * i / 40, 0.0) for i in range(41)]
    draw.line([(x, sag(x)) for x, _ in main], fill=_shade(steel, 0.95), width=cable)
    draw.line([(0, deck_top - 0.02 * h), (towers[0], 0.04 * h)], fill=_shade(steel, 0.95), width=cable)
    draw.line([(towers[1], 0.04 * h), (w, deck_top - 0.02 * h)], fill=_shade(steel, 0.95), width=cable)
    draw.rectangle((0, deck_top, w, deck_bottom), fill=_shade(steel, 1.0))
    draw.line([(0, deck_bottom), (w, deck_bottom)], fill=_shade(dark, 0.9), width=cable)
    leg_w = 0.016 * w
    for tx in towers:
        for side in (-1, 1):
            lx = tx + side * 0.022 * w
            draw.rectangle(
                (lx - leg_w / 2, 0, lx + leg_w / 2, h),
                fill=_shade(steel, 1.05 if side * p.light > 0 else 0.85),
            )
        for frac in (0.02, 0.2, 0.4):
            draw.rectangle(
                (tx - 0.03 * w, frac * h, tx + 0.03 * w, frac * h + 0.035 * h), fill=_shade(steel, 1.0)
            )


_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, int, int, Placement], None]] = {
    "tower": _tower,
    "arch": _arch,
    "dome": _dome,
    "pyramid": _pyramid,
    "wheel": _wheel,
    "bridge": _bridge,
}
