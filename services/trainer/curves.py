"""The training curves as a PNG: every loss a task reports, per step (log scale, smoothed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_COLOURS = ((20, 20, 20), (200, 60, 40), (40, 110, 200), (40, 160, 80), (150, 80, 170), (200, 140, 20))


def smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
    """Running mean over the last ``window`` values (fewer at the start)."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, len(values) + 1)
    counts = np.minimum(index, window)
    return np.asarray((cumulative[index] - cumulative[index - counts]) / counts)


def draw_curves(
    history: Sequence[Mapping[str, float]],
    path: str | Path,
    *,
    title: str = "training loss",
    size: tuple[int, int] = (900, 500),
) -> Path:
    """Draw each loss in ``history`` (one mapping per step; ``step`` and ``epoch`` are not losses)."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    names = [k for k in (history[0] if history else {}) if k not in ("step", "epoch")]
    series = {n: smooth(np.array([h.get(n, np.nan) for h in history], np.float64)) for n in names}
    values = np.concatenate(list(series.values())) if series else np.ones(1)
    positive = values[np.isfinite(values) & (values > 0)]
    low = math.floor(math.log10(positive.min())) if len(positive) else -1
    high = max(math.ceil(math.log10(positive.max())) if len(positive) else 1, low + 1)
    steps = max(len(history), 2)

    def to_xy(i: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * i / (steps - 1)
        clipped = max(value, 10.0**low) if math.isfinite(value) else 10.0**low
        y = top + (height - top - bottom) * (high - math.log10(clipped)) / (high - low)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=(120, 120, 120))
    for decade in range(low, high + 1):
        _, y = to_xy(0, 10.0**decade)
        draw.line((left, y, width - right, y), fill=(225, 225, 225))
        draw.text((8, y - 6), f"1e{decade}", fill=(60, 60, 60))
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, _ = to_xy(round(fraction * (steps - 1)), 1.0)
        draw.text((x - 10, height - bottom + 8), str(round(fraction * steps)), fill=(60, 60, 60))
    draw.text((width // 2 - 20, height - 22), "step", fill=(60, 60, 60))
    draw.text((left, 8), f"{title} (log scale, 20-step mean)", fill=(20, 20, 20))
    for k, (name, curve) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        if len(curve) > 1:
            draw.line([to_xy(i, float(v)) for i, v in enumerate(curve)], fill=colour, width=2)
        draw.text((width - right - 90, top + 8 + 14 * k), name, fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
