"""The one preprocessing of telescope frames, for training and for serving: a frame becomes the classifier's
``[size, size]`` float32 input in [0, 1].

Steps, in order (:func:`prepare`):

1. **Missing values**: NaN and +-inf pixels become the median of the frame's finite pixels.
2. **Binning** (:func:`bin_median`): boxcar median over ``bin_factor`` x ``bin_factor`` blocks, as the
   original classifier's ``imbin.py -b 9`` did; the result stays float (the median of an even block is the
   mean of its two middle values). The frame is first cropped to a multiple of the factor by dropping its
   last ``rows % bin_factor`` rows and ``columns % bin_factor`` columns (at most ``bin_factor - 1`` of each:
   the frame's edge), so binned pixel ``(i, j)`` is exactly raw block ``[i*f:(i+1)*f, j*f:(j+1)*f]``.
   ``bin_factor = 0`` chooses the factor per frame: the largest that keeps the binned frame at least
   ``size`` on its shorter side (``max(1, min(rows, columns) // size)``): 9 for 2048 x 2056 frames (2x2
   binned IO:O) at 224 px, 18 for the same field unbinned, so the network always sees the same field.
3. **Stretch** to [0, 1] (:func:`stretch_frame`), computed on the binned frame:

   - ``"asinh"`` (default): the 0.5th and 99.5th percentiles map to 0 and 1 (clipped), then
     ``asinh(x / 0.1) / asinh(1 / 0.1)``: linear near the sky, logarithmic for stars, so both faint
     background structure (a shutter band) and bright star shapes (a wobbling mirror) stay visible.
     Percentiles rather than min/max so hot pixels, cosmic rays and saturated stars cannot squash the sky.
   - ``"linear"``: the same percentile clip, linear.
   - ``"zscale"``: IRAF/DS9 zscale limits (1000 regularly spaced samples, contrast 0.25, 2.5-sigma
     rejection, 5 iterations), linear between them.

   A flat frame (upper limit <= lower limit) becomes all zeros. Everything is deterministic: percentiles
   use numpy's linear interpolation, zscale samples a fixed grid.
4. **Size**: centre crop (or centred zero-padding) of each axis to ``size``.

:class:`PreprocessSpec` records the parameters, and goes into a model's ONNX metadata
(:meth:`~PreprocessSpec.to_metadata`) so serving reads back exactly what training used
(:meth:`~PreprocessSpec.from_metadata`). The constants above are part of :data:`VERSION`: changing any of
them must change it, and a model exported under another version is refused rather than fed drifted input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.errors import UserError

#: The algorithm version written into model metadata; bump it when any step or constant below changes.
VERSION = "tessera.frames.preprocess/1"
STRETCHES = ("asinh", "linear", "zscale")
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
#: Where asinh turns from linear to logarithmic, as a fraction of the percentile range.
ASINH_SOFTENING = 0.1
ZSCALE_SAMPLES = 1000
ZSCALE_CONTRAST = 0.25
ZSCALE_REJECT_SIGMA = 2.5
ZSCALE_MAX_REJECT = 0.5
ZSCALE_MIN_PIXELS = 5
ZSCALE_ITERATIONS = 5
MAX_BIN_FACTOR = 64
MAX_SIZE = 4096

_PREFIX = "tessera.frames."


def prepare(data: np.ndarray, *, bin_factor: int = 9, size: int = 224, stretch: str = "asinh") -> np.ndarray:
    """``data`` (a 2-D frame, any float or int dtype) as the classifier's float32 ``[size, size]`` input in
    [0, 1]: missing values filled, median-binned, stretched, centre-cropped or padded (module docstring).

    A frame with no finite pixel raises UserError.
    """
    PreprocessSpec(bin_factor, size, stretch)  # checks the parameters
    frame = fill_missing(np.asarray(data))
    factor = bin_factor or auto_bin_factor(frame.shape, size)
    return fit_square(stretch_frame(bin_median(frame, factor), stretch), size)


def auto_bin_factor(shape: tuple[int, ...], size: int) -> int:
    """The largest factor that keeps the binned frame's shorter side at least ``size`` (1 at least)."""
    return max(1, min(min(shape) // size, MAX_BIN_FACTOR))


def fill_missing(data: np.ndarray) -> np.ndarray:
    """``data`` as float32 2-D with NaN and infinite pixels replaced by the median of the finite ones."""
    frame = np.asarray(data, dtype=np.float32)
    if frame.ndim != 2:
        raise UserError(f"a frame must be a 2-D array, got shape {frame.shape}")
    finite = np.isfinite(frame)
    if finite.all():
        return frame
    if not finite.any():
        raise UserError(f"the frame ({frame.shape[0]} x {frame.shape[1]}) holds no finite pixel value")
    return np.where(finite, frame, np.median(frame[finite])).astype(np.float32)


def bin_median(frame: np.ndarray, factor: int) -> np.ndarray:
    """Boxcar median of ``factor`` x ``factor`` blocks, as float32 ``[rows // factor, columns // factor]``.

    The trailing ``rows % factor`` rows and ``columns % factor`` columns are dropped first (the frame is
    cropped to a multiple of the factor at its far edges). Vectorised: the frame is reshaped to
    ``[rows', factor, columns', factor]`` blocks and the median taken over the two block axes at once.
    """
    array = np.asarray(frame, dtype=np.float32)
    if factor < 1:
        raise UserError(f"bin factor must be >= 1, got {factor}")
    if factor == 1:
        return array.copy()
    rows, columns = array.shape[0] // factor, array.shape[1] // factor
    if rows == 0 or columns == 0:
        raise UserError(
            f"a {array.shape[0]} x {array.shape[1]} frame is smaller than one {factor} x {factor} bin; "
            "use a smaller bin factor"
        )
    blocks = array[: rows * factor, : columns * factor].reshape(rows, factor, columns, factor)
    return np.median(blocks, axis=(1, 3)).astype(np.float32)


def stretch_frame(frame: np.ndarray, how: str = "asinh") -> np.ndarray:
    """``frame`` (finite values) mapped to [0, 1] by ``how`` ("asinh", "linear" or "zscale"), float32."""
    values = np.asarray(frame, dtype=np.float64)
    if how == "zscale":
        low, high = zscale_limits(values)
    elif how in {"asinh", "linear"}:
        low, high = (float(v) for v in np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    else:
        raise UserError(f"stretch must be one of {', '.join(STRETCHES)}, got {how!r}")
    if not high > low:
        return np.zeros(values.shape, np.float32)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    if how == "asinh":
        scaled = np.arcsinh(scaled / ASINH_SOFTENING) / np.arcsinh(1.0 / ASINH_SOFTENING)
    return scaled.astype(np.float32)


def zscale_limits(frame: np.ndarray) -> tuple[float, float]:
    """IRAF's zscale display limits: a line fitted (with rejection) to the sorted sample of the frame's
    pixels; its slope over the contrast sets the range about the median, bounded by the sample's extremes."""
    flat = np.asarray(frame, dtype=np.float64).ravel()
    stride = max(1, flat.size // ZSCALE_SAMPLES)
    samples = np.sort(flat[::stride][:ZSCALE_SAMPLES])
    count = samples.size
    low, high = float(samples[0]), float(samples[-1])
    centre = (count - 1) // 2
    median = float(np.median(samples))
    least = max(ZSCALE_MIN_PIXELS, int(count * ZSCALE_MAX_REJECT))
    if count < least:
        return low, high
    position = np.arange(count, dtype=np.float64)
    good = np.ones(count, bool)
    bad = np.zeros(count, bool)
    grow = np.ones(max(1, int(count * 0.01)))
    slope = 0.0
    for _ in range(ZSCALE_ITERATIONS):
        kept = int(good.sum())
        if kept < least:
            break
        slope, intercept = np.polyfit(position[good], samples[good], 1)
        residual = samples - (slope * position + intercept)
        threshold = ZSCALE_REJECT_SIGMA * residual[good].std()
        bad |= np.abs(residual) > threshold
        # Reject the neighbours of every outlier too (IRAF's "grow"), so a star's wings go with its core.
        good = np.convolve(bad, grow, mode="same") == 0
        if int(good.sum()) >= kept:
            break
    if int(good.sum()) < least:
        return low, high
    slope /= ZSCALE_CONTRAST
    return max(low, median - centre * slope), min(high, median + (count - 1 - centre) * slope)


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` centre-cropped, or centred on zeros, to float32 ``[size, size]``."""
    out = np.zeros((size, size), np.float32)
    source, target = [], []
    for length in image.shape:
        if length >= size:
            start = (length - size) // 2
            source.append(slice(start, start + size))
            target.append(slice(0, size))
        else:
            start = (size - length) // 2
            source.append(slice(0, length))
            target.append(slice(start, start + length))
    out[tuple(target)] = image[tuple(source)]
    return out


@dataclass(frozen=True)
class PreprocessSpec:
    """The parameters of :func:`prepare`, as a model records them. ``bin_factor`` 0: chosen per frame."""

    bin_factor: int = 9
    size: int = 224
    stretch: str = "asinh"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.bin_factor, bool) or not isinstance(self.bin_factor, int):
            problems.append(f"bin_factor must be a whole number, got {self.bin_factor!r}")
        elif not 0 <= self.bin_factor <= MAX_BIN_FACTOR:
            problems.append(f"bin_factor must be 0 (per frame) or 1..{MAX_BIN_FACTOR}, got {self.bin_factor}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= MAX_SIZE:
            problems.append(f"size must be a whole number of pixels 1..{MAX_SIZE}, got {self.size!r}")
        if self.stretch not in STRETCHES:
            problems.append(f"stretch must be one of {', '.join(STRETCHES)}, got {self.stretch!r}")
        if problems:
            raise UserError("bad frame preprocessing: " + "; ".join(problems))

    def apply(self, data: np.ndarray) -> np.ndarray:
        """:func:`prepare` with these parameters."""
        return prepare(data, bin_factor=self.bin_factor, size=self.size, stretch=self.stretch)

    def describe(self) -> str:
        """One line for people: what a frame goes through."""
        binning = (
            f"binned by max(1, min(shorter side // size, {MAX_BIN_FACTOR}))"
            if self.bin_factor == 0
            else f"binned {self.bin_factor}x{self.bin_factor}"
        )
        limits = {
            "asinh": f"percentiles {LOW_PERCENTILE}-{HIGH_PERCENTILE} -> [0, 1], asinh (softening "
            f"{ASINH_SOFTENING})",
            "linear": f"percentiles {LOW_PERCENTILE}-{HIGH_PERCENTILE} -> [0, 1], linear",
            "zscale": f"zscale (contrast {ZSCALE_CONTRAST}) -> [0, 1], linear",
        }[self.stretch]
        return (
            f"{VERSION}: NaN -> frame median; {binning} (boxcar median, far edges cropped to a multiple); "
            f"{limits}; centre crop or zero-pad to {self.size}x{self.size}"
        )

    def to_metadata(self) -> dict[str, str]:
        """String key/values for a model's metadata (ONNX ``metadata_props``)."""
        return {
            f"{_PREFIX}version": VERSION,
            f"{_PREFIX}bin_factor": str(self.bin_factor),
            f"{_PREFIX}size": str(self.size),
            f"{_PREFIX}stretch": self.stretch,
            f"{_PREFIX}description": self.describe(),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> PreprocessSpec:
        """The spec a model was trained with, from its metadata; UserError when it is missing, malformed or
        made by another version of the preprocessing (its input would differ from what it learnt)."""
        version = metadata.get(f"{_PREFIX}version")
        if version is None:
            raise UserError(
                f"the model's metadata has no {_PREFIX}version: it does not record its preprocessing"
            )
        if version != VERSION:
            raise UserError(
                f"the model was trained on frames prepared by {version}; this code prepares {VERSION}: "
                "retrain the model or serve it with the matching release"
            )
        values = {}
        for key in ("bin_factor", "size", "stretch"):
            if f"{_PREFIX}{key}" not in metadata:
                raise UserError(f"the model's metadata has no {_PREFIX}{key}")
            values[key] = metadata[f"{_PREFIX}{key}"]
        try:
            bin_factor, size = int(values["bin_factor"]), int(values["size"])
        except ValueError as error:
            raise UserError(f"the model's preprocessing metadata is malformed: {error}") from error
        return cls(bin_factor, size, values["stretch"])
