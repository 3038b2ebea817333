"""The sky demo's picture: the held-out frames' true positions against the model's predictions and the
baseline's answer, on a map of the region (:func:`draw_positions`, drawn with PIL)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.celnav import EARTH_RADIUS_KM, KM_PER_NM

_TRUE, _PREDICTED, _CENTRE, _LINK, _GRID, _REGION = (
    (30, 90, 200),
    (235, 120, 20),
    (200, 20, 40),
    (190, 190, 190),
    (230, 230, 230),
    (90, 90, 90),
)


def draw_positions(
    path: Path,
    *,
    truth: np.ndarray,
    predicted: np.ndarray,
    centre: tuple[float, float],
    latitude: Sequence[float],
    longitude: Sequence[float],
    title: str,
    width: int = 1000,
    height: int = 860,
) -> Path:
    """A PNG map (equirectangular about the region's centre) of the true held-out positions (blue dots),
    the model's predictions (orange crosses, a grey line to their truth; triangles at the border when off
    the chart), the baseline's answer (the red square) and the region (grey box)."""
    from PIL import Image, ImageDraw

    lat_c, lon_c = centre
    squeeze = math.cos(math.radians(lat_c))

    def xy(lat: float, lon: float) -> tuple[float, float]:
        return ((lon - lon_c + 180.0) % 360.0 - 180.0) * squeeze, lat - lat_c

    corners = [xy(a, o) for a in latitude for o in longitude]
    half_x = max(abs(x) for x, _ in corners)
    half_y = max(abs(y) for _, y in corners)
    points = [xy(a, o) for a, o in np.concatenate([truth, predicted])]
    # Room for the predictions, up to three times the region's width and height (the rest sit at the edge).
    reach_x = min(max([half_x, *(abs(x) for x, _ in points)]), 3 * half_x) * 1.08
    reach_y = min(max([half_y, *(abs(y) for _, y in points)]), 3 * half_y) * 1.08
    top, bottom, left, right = 70, 90, 80, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    scale = min(plot_w / (2 * reach_x), plot_h / (2 * reach_y))
    reach_x, reach_y = plot_w / 2 / scale, plot_h / 2 / scale

    def pixel(x: float, y: float) -> tuple[float, float, bool]:
        inside = abs(x) <= reach_x and abs(y) <= reach_y
        x, y = max(-reach_x, min(reach_x, x)), max(-reach_y, min(reach_y, y))
        return left + plot_w / 2 + x * scale, top + plot_h / 2 - y * scale, inside

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(13)
    step = _tick_step(2 * max(reach_y, reach_x / squeeze))
    for lat in np.arange(math.ceil((lat_c - reach_y) / step) * step, lat_c + reach_y, step):
        _, y, _ = pixel(0.0, lat - lat_c)
        draw.line([(left, y), (left + plot_w, y)], fill=_GRID)
        draw.text((left - 6, y), _degrees(lat, "N", "S"), fill="black", font=small, anchor="rm")
    span = reach_x / squeeze
    for lon in np.arange(math.ceil((lon_c - span) / step) * step, lon_c + span, step):
        x, _, _ = pixel((lon - lon_c) * squeeze, 0.0)
        draw.line([(x, top), (x, top + plot_h)], fill=_GRID)
        wrapped = (lon + 180.0) % 360.0 - 180.0
        draw.text((x, top + plot_h + 6), _degrees(wrapped, "E", "W"), fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    x0, y0, _ = pixel(-half_x, half_y)
    x1, y1, _ = pixel(half_x, -half_y)
    draw.rectangle([x0, y0, x1, y1], outline=_REGION, width=2)
    for (t_lat, t_lon), (p_lat, p_lon) in zip(truth, predicted, strict=True):
        tx, ty, _ = pixel(*xy(t_lat, t_lon))
        px, py, inside = pixel(*xy(p_lat, p_lon))
        draw.line([(tx, ty), (px, py)], fill=_LINK, width=1)
        if inside:
            draw.line([(px - 5, py - 5), (px + 5, py + 5)], fill=_PREDICTED, width=2)
            draw.line([(px - 5, py + 5), (px + 5, py - 5)], fill=_PREDICTED, width=2)
        else:
            draw.polygon([(px, py - 6), (px - 6, py + 5), (px + 6, py + 5)], fill=_PREDICTED)
    for t_lat, t_lon in truth:
        tx, ty, _ = pixel(*xy(t_lat, t_lon))
        draw.ellipse([tx - 4, ty - 4, tx + 4, ty + 4], fill=_TRUE)
    cx, cy, _ = pixel(0.0, 0.0)
    draw.rectangle([cx - 7, cy - 7, cx + 7, cy + 7], fill=_CENTRE)
    # A scale bar of a round number of km, about a fifth of the plot wide.
    km_per_px = EARTH_RADIUS_KM * math.radians(1.0) / scale
    bar_km = _tick_step(plot_w * km_per_px / 2.5)
    bar_px = bar_km / km_per_px
    bx, by = left + plot_w - bar_px - 16, top + plot_h - 18
    draw.rectangle([bx - 8, by - 24, bx + bar_px + 8, by + 8], fill="white")
    draw.line([(bx, by), (bx + bar_px, by)], fill="black", width=3)
    draw.text(
        (bx + bar_px / 2, by - 4),
        f"{bar_km:g} km ({bar_km / KM_PER_NM:.0f} nm)",
        fill="black",
        font=small,
        anchor="mb",
    )
    draw.text((width / 2, 14), title, fill="black", font=font, anchor="mt")
    draw.text(
        (width / 2, 40),
        "equirectangular about the region's centre; off-chart predictions are triangles at the edge",
        fill=(80, 80, 80),
        font=small,
        anchor="mt",
    )
    legend = [
        (_TRUE, "true position"),
        (_PREDICTED, "model's prediction"),
        (_CENTRE, "baseline: centre of the region"),
        (_REGION, "the region rendered"),
    ]
    x = left
    for colour, label in legend:
        draw.rectangle([x, height - 32, x + 14, height - 18], fill=colour)
        draw.text((x + 20, height - 25), label, fill="black", font=small, anchor="lm")
        x += 40 + int(draw.textlength(label, font=small))
    image.save(path)
    return path


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tick_step(span: float) -> float:
    """A round step giving a handful of ticks over ``span``."""
    raw = span / 8 if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * power:
            return multiple * power
    return 10 * power


def _degrees(value: float, positive: str, negative: str) -> str:
    value = round(float(value), 6)
    return f"{abs(value):g} {positive if value >= 0 else negative}"
