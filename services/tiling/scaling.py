"""How image pixels become model input: band selection and value scaling to float32, never by a guess.

The model's metadata says what it takes: ``tessera.input_scale`` (what an 8-bit pixel is multiplied by:
``"1/255"``, the default, for input in ``[0, 1]``; ``"1"`` for raw 8-bit values) and, optionally,
``tessera.input_range`` (``"low,high"``: the pixel values that mean black and white). A request may state a
:class:`ScalingRule` (``"scaling": {"mode": "range", "min": 0, "max": 4095}``, ``{"mode": "none"}``,
``{"bands": [1, 1, 1]}`` or ``{"bands": "replicate"}``), which wins over the metadata. What neither
covers is a UserError naming the image's dtype and bands, what the model takes, and the rule to state.

Values
    Each pixel is mapped to ``[0, 1]``, then multiplied by the model's ``output_scale`` (1 for input in
    ``[0, 1]``, 255 for raw 8-bit values):

    - a stated range ``(low, high)`` (rule ``"range"``, else ``tessera.input_range``), whatever the dtype:
      ``(x - low) / (high - low)``, clipped to ``[0, 1]``;
    - else uint8: ``x / 255``;
    - else other unsigned integers: ``x / (2**nbits - 1)`` when the file declares its bit depth (GDAL
      ``NBITS``, e.g. 12 for 12-bit data in uint16; 16 for the whole uint16 range). **Undeclared**, a
      uint16 (or wider) image is a UserError: dividing by 65535 would make 12-bit data (most satellite
      sensors) 16 times too dark, so the request states ``--scale 0,65535`` or ``--scale 0,4095``;
    - **signed integers** (e.g. int16 with negative values) and **floats** (``0..1``, ``0..255``,
      reflectance ``0..10000``, ...) have no range to assume: they are a UserError until a rule states
      the range, or ``"none"`` says the values already are the model's input (passed unchanged).

    Nodata pixels (and NaN) become 0.

Bands
    The model has ``channels`` inputs. ``bands`` (1-based image band numbers, one per channel, from the
    rule or the caller) chooses them. Otherwise an image with at least ``channels`` bands feeds its first
    ``channels`` bands (RGBA or RGB+NIR -> RGB). A **single-band** image feeding a model of several
    channels is a UserError unless asked for: ``"bands": "replicate"`` (or ``[1, 1, 1]``) feeds the grey
    band to every channel, which a colour model may see worse than colour. Any other mismatch is a
    UserError asking for ``bands``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from services.errors import UserError

INPUT_SCALE_KEY = "tessera.input_scale"
INPUT_RANGE_KEY = "tessera.input_range"
#: The value modes a rule may state.
SCALING_MODES = ("range", "none")
REPLICATE = "replicate"
#: How the remedy is spelled to the user, in every error.
_RULE_HELP = (
    'state a scaling rule: "scaling": {"mode": "range", "min": LOW, "max": HIGH} (the values meaning black '
    'and white; others are clipped), or {"mode": "none"} when the values already are the model\'s input '
    "(tessera run and submit: --scale LOW,HIGH or --scale none)"
)


@dataclass(frozen=True)
class ScalingRule:
    """A request's statement of how its image's pixels become model input; it wins over the model's metadata.

    ``mode``: ``"range"`` (``low``..``high`` -> the model's range, clipped), ``"none"`` (values passed
    unchanged) or None (the model's and the dtype's rule, see the module doc). ``bands``: 1-based image
    band per model channel, ``"replicate"`` (a single-band image fed to every channel), or None.
    """

    mode: str | None = None
    low: float | None = None
    high: float | None = None
    bands: tuple[int, ...] | str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in SCALING_MODES:
            raise UserError(f"scaling mode must be one of {list(SCALING_MODES)}, got {self.mode!r}")
        if self.mode == "range":
            if self.low is None or self.high is None or not self.high > self.low:
                raise UserError(
                    f'scaling mode "range" needs "min" < "max" (the pixel values meaning black and white), '
                    f"got min {self.low}, max {self.high}"
                )
        elif self.low is not None or self.high is not None:
            raise UserError(f'"min" and "max" go with scaling mode "range", not {self.mode!r}')
        if isinstance(self.bands, str) and self.bands != REPLICATE:
            raise UserError(
                f'scaling bands must be a list of 1-based bands or "{REPLICATE}", got {self.bands!r}'
            )

    @classmethod
    def parse(cls, value: Mapping[str, Any] | str | None) -> ScalingRule | None:
        """A rule from a request's ``scaling`` document or a command line's text; None stays None.

        Documents: ``{"mode": "range", "min": 0, "max": 4095}``, ``{"mode": "none"}``, with an optional
        ``"bands"`` (a list, or ``"replicate"``). Text: ``"0,4095"`` (a range), ``"none"``, ``"replicate"``.
        """
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            if text in ("none", REPLICATE):
                return cls(mode="none") if text == "none" else cls(bands=REPLICATE)
            low, high = parse_value_range(text)
            return cls(mode="range", low=low, high=high)
        unknown = set(value) - {"mode", "min", "max", "bands"}
        if unknown:
            raise UserError(f"scaling takes mode, min, max and bands; unknown: {sorted(unknown)}")
        bands = value.get("bands")
        if bands is not None and not isinstance(bands, str):
            if not isinstance(bands, Sequence) or not all(isinstance(b, int) for b in bands):
                raise UserError(
                    f'scaling bands must be a list of 1-based bands or "{REPLICATE}", got {bands!r}'
                )
            bands = tuple(bands)
        return cls(
            mode=value.get("mode"),
            low=_number(value.get("min"), "min"),
            high=_number(value.get("max"), "max"),
            bands=bands,
        )


def rule_to_json(rule: ScalingRule) -> dict[str, Any]:
    """The request document of ``rule`` (what :meth:`ScalingRule.parse` reads back to the same rule)."""
    body: dict[str, Any] = {}
    if rule.mode is not None:
        body["mode"] = rule.mode
    if rule.low is not None:
        body["min"] = rule.low
    if rule.high is not None:
        body["max"] = rule.high
    if rule.bands is not None:
        body["bands"] = rule.bands if isinstance(rule.bands, str) else list(rule.bands)
    return body


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"scaling {name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InputScaling:
    """Band selection and value scaling from image pixels to the model's float32 input (see module doc).

    ``passthrough``: values go to the model unchanged (rule ``"none"``); ``replicate``: a single-band
    image feeds every channel (rule ``bands: "replicate"``).
    """

    channels: int = 3
    value_range: tuple[float, float] | None = None
    output_scale: float = 1.0
    bands: tuple[int, ...] | None = None
    passthrough: bool = False
    replicate: bool = False

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
        rule: ScalingRule | None = None,
    ) -> InputScaling:
        """Scaling from a model's metadata (``tessera.input_scale``, ``tessera.input_range``).

        ``value_range`` and ``bands`` from a request win over the metadata, and ``rule`` over both.
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
            try:
                value_range = parse_value_range(metadata[INPUT_RANGE_KEY])
            except UserError as error:
                raise UserError(
                    f"the model's metadata {INPUT_RANGE_KEY} is wrong: {error}; fix the model (or state the "
                    f"range with --scale LOW,HIGH / the request's scaling)"
                ) from None
        scaling = cls(
            channels=channels,
            value_range=value_range,
            output_scale=output_scale,
            bands=tuple(bands) if bands is not None else None,
        )
        return scaling.with_rule(rule)

    def with_rule(self, rule: ScalingRule | None) -> InputScaling:
        """This scaling with a request's rule laid over it (None: unchanged)."""
        if rule is None:
            return self
        scaling = self
        if rule.mode == "range":
            assert rule.low is not None and rule.high is not None
            scaling = replace(scaling, value_range=(rule.low, rule.high), passthrough=False)
        elif rule.mode == "none":
            scaling = replace(scaling, value_range=None, passthrough=True)
        if rule.bands == REPLICATE:
            scaling = replace(scaling, bands=None, replicate=True)
        elif isinstance(rule.bands, tuple):
            scaling = replace(scaling, bands=rule.bands, replicate=False)
        return scaling

    def for_image(
        self,
        dtype: np.dtype | str,
        band_count: int,
        *,
        nbits: int | None = None,
        bands: Sequence[int] | None = None,
    ) -> InputScaling:
        """This scaling settled for one image: its bands checked and the value rule fixed (a declared
        ``nbits`` of unsigned pixels becomes the range). UserError when the rules do not cover the image."""
        self.band_indexes(band_count, bands)
        kind = np.dtype(dtype)
        if self.value_range is None and not self.passthrough and kind.kind == "u" and kind.itemsize > 1:
            if not nbits:
                raise UserError(
                    f"the image is {kind} with no declared bit depth (GDAL NBITS) and the model takes "
                    f"{self._expects()}: 16-bit data would be divided by {np.iinfo(kind).max}, but 12-bit "
                    f"data stored as {kind} would then come out 16 times too dark; state the range: "
                    f"--scale 0,{np.iinfo(kind).max} (all {kind.itemsize * 8} bits) or --scale 0,4095 "
                    f'(12-bit) (a request: "scaling": {{"mode": "range", "min": 0, "max": ...}})'
                )
            if not 0 < nbits < kind.itemsize * 8:
                return self  # the full width of the dtype: its own range
            return replace(self, value_range=(0.0, float(2**nbits - 1)))
        self.unit_range(kind, band_count=band_count)
        return self

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
        if band_count == 1 and self.replicate:
            return (1,) * self.channels
        if band_count == 1:
            raise UserError(
                f"the image has 1 band but the model takes {self._expects()}; "
                f'to feed the grey band to every channel, state it: "scaling": {{"bands": "{REPLICATE}"}} '
                f"(a colour model may find fewer objects in grey)"
            )
        raise UserError(
            f"the image has {band_count} bands but the model takes {self.channels} channels; "
            f'choose {self.channels} bands explicitly: "scaling": {{"bands": [...]}} (1-based)'
        )

    def unit_range(
        self, dtype: np.dtype | str, *, band_count: int | None = None
    ) -> tuple[float, float] | None:
        """The (low, high) mapped to [0, 1] for ``dtype``; None when values pass unchanged (rule "none").

        Signed integers and floats without a stated range are a UserError (see the module doc).
        """
        if self.value_range is not None:
            return self.value_range
        if self.passthrough:
            return None
        kind = np.dtype(dtype)
        if kind.kind == "u":
            return 0.0, float(np.iinfo(kind).max)
        bands = f" with {band_count} band{'s' if band_count != 1 else ''}" if band_count is not None else ""
        if kind.kind == "i":
            why = "signed pixels (values may be negative) have no range to assume"
        elif kind.kind == "f":
            why = "float pixels (0..1? 0..255? reflectance?) have no range to assume"
        else:
            raise UserError(
                f"pixels of type {kind} cannot be scaled to a model input; use integers or floats"
            )
        raise UserError(f"the image is {kind}{bands}; the model takes {self._expects()}; {why}: {_RULE_HELP}")

    def uint8_affine(
        self, dtype: np.dtype | str, nodata: float | None
    ) -> tuple[float, int, float | None] | None:
        """This scaling of ``dtype`` pixels as ``(scale, zero_point, clip_max)``: ``y = (x - zero_point) *
        scale``, clipped to ``[0, clip_max]`` when that is not None — what a model composed to take uint8
        computes (services/inference/native_input.py). None where it is not that simple: other dtypes, a
        range whose low end is not a whole uint8 value, or a nodata value the formula would not make 0.
        Multiplying by the reciprocal, the values agree with :meth:`apply` to within one float32 ulp."""
        if np.dtype(dtype) != np.uint8:
            return None
        span = self.unit_range(np.dtype(np.uint8))
        if span is None:  # rule "none": the values are the input
            scale, zero_point, clip_max = 1.0, 0, None
        else:
            low, high = span
            if not (float(low).is_integer() and 0 <= low <= 255):
                return None
            scale = self.output_scale / (float(np.float32(high)) - float(np.float32(low)))
            zero_point = int(low)
            clip_max = self.output_scale if self.value_range is not None else None
        # A nodata value that is no uint8 value matches no pixel: nothing to mask.
        if nodata is not None and not np.isnan(nodata) and float(nodata).is_integer() and 0 <= nodata <= 255:
            value = (nodata - zero_point) * scale
            if clip_max is not None:
                value = min(max(value, 0.0), clip_max)
            if value != 0.0:
                return None
        return scale, zero_point, clip_max

    def _expects(self) -> str:
        """What the model takes, in words, for error messages."""
        if self.output_scale == 1.0:
            what = f"{INPUT_SCALE_KEY} 1/255: uint8 pixels / 255, values in [0, 1]"
        elif self.output_scale == 255.0:
            what = f"{INPUT_SCALE_KEY} 1: raw uint8 values in [0, 255]"
        else:
            what = f"values in [0, {self.output_scale:g}]"
        return f"{self.channels} channel{'s' if self.channels != 1 else ''}, {what}"

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
        if span is None:  # rule "none": the values are the model's input already
            np.copyto(out, raw, casting="unsafe")
            clip = False
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
        then the nodata mask, a pass over the tile, changes nothing. Settled once per scaling, dtype and
        value (the reader calls :meth:`apply` once per strip piece of every tile)."""
        if dtype.kind not in "ui":
            return False
        return _scales_to_zero(self, dtype, float(nodata))


@functools.lru_cache(maxsize=64)
def _scales_to_zero(scaling: InputScaling, dtype: np.dtype, nodata: float) -> bool:
    info = np.iinfo(dtype)
    if not info.min <= nodata <= info.max:
        return False
    probe = np.array([nodata]).astype(dtype)
    if probe[0] != nodata:  # not a value of this dtype: the mask is left to decide, as before
        return False
    return bool(scaling.apply(probe)[0] == 0.0)


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
