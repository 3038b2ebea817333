"""How image pixels become model input: band selection and a dtype-aware scaling to float32.

Values
    Each pixel is first mapped to ``[0, 1]``:

    - ``value_range=(low, high)`` given (by the request or the model's ``tessera.input_range`` metadata):
      ``(x - low) / (high - low)``, clipped to ``[0, 1]``, whatever the dtype. Use it for 12-bit imagery
      stored as uint16 (``(0, 4095)``) or reflectances stored as floats.
    - otherwise by dtype: uint8 ``x / 255``; uint16 ``x / 65535``; other integers ``x / max(dtype)``
      clipped to ``[0, 1]``; floats are taken as already in ``[0, 1]`` and clipped.

    The result is then multiplied by ``output_scale``: 1 for models that want ``[0, 1]`` (the default,
    metadata ``tessera.input_scale = "1/255"``), 255 for models that want raw 8-bit values
    (``tessera.input_scale = "1"``). Nodata pixels (and NaN) become 0.

Bands
    The model has ``channels`` inputs. ``bands`` (1-based image band numbers, one per channel) chooses them
    when given. Otherwise: an image with at least ``channels`` bands feeds its first ``channels`` bands
    (RGBA or RGB+NIR -> RGB); a single-band image is replicated to every channel (grey -> RGB); any other
    mismatch is a UserError asking for ``bands``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from services.errors import UserError

INPUT_SCALE_KEY = "tessera.input_scale"
INPUT_RANGE_KEY = "tessera.input_range"


@dataclass(frozen=True)
class InputScaling:
    """Band selection and value scaling from image pixels to the model's float32 input (see module doc)."""

    channels: int = 3
    value_range: tuple[float, float] | None = None
    output_scale: float = 1.0
    bands: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise UserError(f"the model must take at least one channel, got {self.channels}")
        if self.value_range is not None and not self.value_range[1] > self.value_range[0]:
            raise UserError(f"input value range must be (low, high) with high > low, got {self.value_range}")
        if self.bands is not None and len(self.bands) != self.channels:
            raise UserError(
                f"give one band per model channel: {self.channels} channels, bands {list(self.bands)}"
            )

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, str],
        *,
        channels: int,
        value_range: tuple[float, float] | None = None,
        bands: Sequence[int] | None = None,
    ) -> InputScaling:
        """Scaling from a model's metadata (``tessera.input_scale``, ``tessera.input_range``).

        ``value_range`` and ``bands`` from a request win over the metadata.
        """
        output_scale = 1.0
        text = metadata.get(INPUT_SCALE_KEY)
        if text:
            try:
                scale = float(Fraction(text.strip()))
            except (ValueError, ZeroDivisionError) as error:
                raise UserError(
                    f"model metadata {INPUT_SCALE_KEY}={text!r} is not a number like '1/255'"
                ) from error
            if scale <= 0:
                raise UserError(f"model metadata {INPUT_SCALE_KEY}={text!r} must be positive")
            # The scale is what an 8-bit pixel is multiplied by: 1/255 -> [0, 1]; 1 -> [0, 255].
            output_scale = scale * 255.0
        if value_range is None and metadata.get(INPUT_RANGE_KEY):
            value_range = parse_value_range(metadata[INPUT_RANGE_KEY])
        return cls(
            channels=channels,
            value_range=value_range,
            output_scale=output_scale,
            bands=tuple(bands) if bands is not None else None,
        )

    def band_indexes(self, band_count: int, bands: Sequence[int] | None = None) -> tuple[int, ...]:
        """The 1-based image band feeding each model channel (``bands`` here wins over ``self.bands``)."""
        chosen = tuple(bands) if bands is not None else self.bands
        if chosen is not None:
            if len(chosen) != self.channels:
                raise UserError(
                    f"give one band per model channel: {self.channels} channels, bands {list(chosen)}"
                )
            bad = [b for b in chosen if not 1 <= b <= band_count]
            if bad:
                raise UserError(f"bands {bad} do not exist: the image has bands 1..{band_count}")
            return chosen
        if band_count >= self.channels:
            return tuple(range(1, self.channels + 1))
        if band_count == 1:
            return (1,) * self.channels
        raise UserError(
            f"the image has {band_count} bands but the model takes {self.channels} channels; "
            f"choose {self.channels} bands explicitly"
        )

    def unit_range(self, dtype: np.dtype | str) -> tuple[float, float] | None:
        """The (low, high) mapped to [0, 1] for ``dtype``; None for floats taken as they are."""
        if self.value_range is not None:
            return self.value_range
        kind = np.dtype(dtype)
        if kind.kind in "ui":
            return 0.0, float(np.iinfo(kind).max)
        if kind.kind == "f":
            return None
        raise UserError(f"pixels of type {kind} cannot be scaled to a model input; use integers or floats")

    def apply(
        self, raw: np.ndarray, *, nodata: float | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Scale native pixels (any shape) to float32 model input; nodata and NaN become 0."""
        if out is None:
            out = np.empty(raw.shape, dtype=np.float32)
        span = self.unit_range(raw.dtype)
        clip = True
        # dtype=float32 forces the float loop (an integer bound would wrap unsigned pixels); a float32
        # division is exact to the last bit and faster than multiplying by a float64 reciprocal.
        if span is None:
            np.copyto(out, raw, casting="unsafe")
        else:
            low, high = np.float32(span[0]), np.float32(span[1])
            if low == 0:
                np.divide(raw, high, out=out, dtype=np.float32, casting="unsafe")
            else:
                np.subtract(raw, low, out=out, dtype=np.float32, casting="unsafe")
                out /= high - low
            # Unsigned pixels scaled by their dtype's full range are in [0, 1] already.
            clip = self.value_range is not None or raw.dtype.kind != "u"
        if self.output_scale != 1.0:
            out *= np.float32(self.output_scale)
        if clip:
            np.clip(out, 0.0, self.output_scale, out=out)
        if nodata is not None and not np.isnan(nodata) and not self._nodata_scales_to_zero(raw.dtype, nodata):
            out[raw == nodata] = 0.0
        if raw.dtype.kind == "f":
            out[np.isnan(raw)] = 0.0  # NaN survives clip; the model must never see it
        return out

    def _nodata_scales_to_zero(self, dtype: np.dtype, nodata: float) -> bool:
        """Whether integer pixels equal to ``nodata`` come out of the scaling as 0 already (uint8 nodata 0):
        then the nodata mask, a pass over the tile, changes nothing."""
        if dtype.kind not in "ui":
            return False
        info = np.iinfo(dtype)
        if not info.min <= nodata <= info.max:
            return False
        probe = np.array([nodata]).astype(dtype)
        if probe[0] != nodata:  # not a value of this dtype: the mask is left to decide, as before
            return False
        return bool(self.apply(probe)[0] == 0.0)


def parse_value_range(text: str) -> tuple[float, float]:
    """``"low,high"`` (e.g. ``"0,4095"``) as a pair of floats; UserError when it is not one."""
    parts = text.replace(" ", "").split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError as error:
        raise UserError(f"input value range {text!r} must be 'low,high', e.g. '0,4095'") from error
    if not high > low:
        raise UserError(f"input value range {text!r} must have high > low")
    return low, high
