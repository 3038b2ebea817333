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

That whole-frame view shows faint background structure (a shutter band) but not the shape of a star: a
2-15 px mirror wobble shrinks to 0.2-1.6 px when binned by 9. So a spec may add a second view
(:func:`prepare_views`, ``stamps`` > 0), the **star stamps**: a ``stamps`` x ``stamps`` grid of
unbinned ``size // stamps`` px cut-outs of the frame (after step 1) around its brightest stars, one per
cell, in order of brightness row by row; a cell with no star left stays 0. The stars are the brightest
pixels of the median-binned frame (step 2, before the stretch: binning by 9 has erased cosmic rays, hot
pixels and faint stars), taken greedily with ties in raster order, each at least one stamp side (raw px,
along rows or columns) from the ones before and whole stamps inside the frame; a stamp is centred on its
binned pixel's centre (raw ``i * f + f // 2``). Each stamp is scaled on its own: its median (the sky) to
0, its brightest pixel to 1, clipped to [0, 1]: a star's shape, whatever its brightness.

:class:`PreprocessSpec` records the parameters, and goes into a model's ONNX metadata
(:meth:`~PreprocessSpec.to_metadata`) so serving reads back exactly what training used
(:meth:`~PreprocessSpec.from_metadata`). The constants above are part of :data:`VERSION`: changing any of
them must change it, and a model exported under another version is refused rather than fed drifted input.
Version 2 adds the star stamps and leaves the whole-frame view as it was in version 1: a spec without
stamps is still written as, and read from, version 1 (older releases serve such models unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.errors import UserError

#: The algorithm version written into model metadata; bump it when any step or constant below changes.
VERSION = "tessera.frames.preprocess/2"
#: The version before the star stamps: the same whole-frame view, which a spec without stamps still writes.
VERSION_WITHOUT_STAMPS = "tessera.frames.preprocess/1"
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
#: Most stamps per side of the star-stamp view; a stamp is at least MIN_STAMP_SIDE px.
MAX_STAMPS = 16
MIN_STAMP_SIDE = 8
#: Brightest binned pixels considered per stamp wanted, before the spacing rule picks the stars.
STAMP_CANDIDATES = 64
#: Bytes of blocks :func:`bin_median` partitions at a time (a stripe that stays in the CPU's cache).
_STRIPE_BYTES = 1 << 19

_PREFIX = "tessera.frames."


def prepare(data: np.ndarray, *, bin_factor: int = 9, size: int = 224, stretch: str = "asinh") -> np.ndarray:
    """``data`` (a 2-D frame, any float or int dtype) as the classifier's float32 ``[size, size]`` input in
    [0, 1]: missing values filled, median-binned, stretched, centre-cropped or padded (module docstring).

    A frame with no finite pixel raises UserError.
    """
    return prepare_views(data, bin_factor=bin_factor, size=size, stretch=stretch)[0]


def prepare_views(
    data: np.ndarray, *, bin_factor: int = 9, size: int = 224, stretch: str = "asinh", stamps: int = 0
) -> np.ndarray:
    """``data`` as the classifier's float32 ``[views, size, size]`` input in [0, 1]: the whole-frame view
    (:func:`prepare`), then, when ``stamps`` > 0, the star stamps (module docstring)."""
    PreprocessSpec(bin_factor, size, stretch, stamps)  # checks the parameters
    frame = fill_missing(np.asarray(data))
    factor = bin_factor or auto_bin_factor(frame.shape, size)
    binned = bin_median(frame, factor)
    whole = fit_square(stretch_frame(binned, stretch), size)
    if not stamps:
        return whole[None]
    return np.stack([whole, star_stamps(frame, binned, factor, size, stamps)])


def star_stamps(frame: np.ndarray, binned: np.ndarray, factor: int, size: int, grid: int) -> np.ndarray:
    """The star-stamp view, float32 ``[size, size]``: ``grid`` x ``grid`` cut-outs of ``frame`` (finite
    float32), ``size // grid`` px each, around the brightest pixels of ``binned`` (``frame`` median-binned
    by ``factor``), each scaled from its median to its peak (module docstring)."""
    side = size // grid
    half = side // 2
    out = np.zeros((size, size), np.float32)
    rows, columns = binned.shape
    centre_rows = np.arange(rows) * factor + factor // 2
    centre_columns = np.arange(columns) * factor + factor // 2
    fits_rows = (centre_rows >= half) & (centre_rows - half + side <= frame.shape[0])
    fits_columns = (centre_columns >= half) & (centre_columns - half + side <= frame.shape[1])
    values = np.where(fits_rows[:, None] & fits_columns[None, :], binned, -np.inf).ravel()
    wanted = grid * grid
    considered = min(values.size, STAMP_CANDIDATES * wanted)
    candidates = np.argpartition(-values, considered - 1)[:considered]
    candidates = candidates[np.lexsort((candidates, -values[candidates]))]  # brightest first, ties in order
    chosen: list[tuple[int, int]] = []
    for index in candidates.tolist():  # a few hundred candidates at most, not the pixels
        if not np.isfinite(values[index]) or len(chosen) == wanted:
            break
        row, column = (int(n) for n in divmod(index, columns))
        centre = int(centre_rows[row]), int(centre_columns[column])
        if all(abs(centre[0] - r) >= side or abs(centre[1] - c) >= side for r, c in chosen):
            chosen.append(centre)
    for cell, (row, column) in enumerate(chosen):
        stamp = frame[row - half : row - half + side, column - half : column - half + side]
        sky, peak = np.float32(np.median(stamp)), stamp.max()
        if peak > sky:
            top, left = (side * n for n in divmod(cell, grid))
            scaled = (stamp - sky) / (peak - sky)
            out[top : top + side, left : left + side] = np.clip(scaled, 0.0, 1.0)
    return out


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
    cropped to a multiple of the factor at its far edges). The values are exactly (bit for bit) those of
    ``np.median`` over each float32 block: the middle value of an odd block, the float32 mean of the two
    middle values of an even one (numpy sums from 0, so a zero median is +0), and for a block holding a
    NaN the NaN that numpy's median returns. Infinities take part as numbers. Factor 1 is a plain copy.

    Vectorised, on one core, with no copy of the frame beyond one pass of its blocks: stripes of block
    rows are copied into a reused, cache-sized ``[rows', columns', factor^2]`` buffer, which one in-place
    ``partition`` at the (upper) middle index orders; the lower middle of an even block is the largest
    value below it. Factor 2 takes min/max over the four pixel planes instead. Whether the frame holds a
    NaN at all (never after :func:`fill_missing`) is one ``max`` over it; if so, the blocks holding one are
    partitioned as numpy's median does it (middle and last) and take its NaN.
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
    cropped = array[: rows * factor, : columns * factor]
    has_nan = bool(np.isnan(cropped.max()))  # max propagates NaN: one cheap pass decides
    if factor == 2 and not has_nan:
        return _median_of_fours(cropped)
    return _median_by_stripes(cropped, factor, has_nan)


def _median_by_stripes(cropped: np.ndarray, factor: int, has_nan: bool) -> np.ndarray:
    """:func:`bin_median` of ``cropped`` (float32, a multiple of ``factor`` each way) by partitioning
    stripes of blocks, each block's pixels row by row (numpy's order for a median over both block axes)."""
    rows, columns = cropped.shape[0] // factor, cropped.shape[1] // factor
    count = factor * factor
    middle = count // 2
    exact_kth = [middle - 1, middle, -1] if count % 2 == 0 else [middle, -1]
    zero, two = np.float32(0.0), np.float32(2.0)
    stripe = max(1, _STRIPE_BYTES // (columns * count * 4))
    buffer = np.empty((min(stripe, rows), columns, count), np.float32)
    binned = np.empty((rows, columns), np.float32)
    for first in range(0, rows, stripe):  # a loop over stripes of block rows, not over pixels
        height = min(stripe, rows - first)
        blocks = buffer[:height]
        blocks.reshape(height, columns, factor, factor)[...] = (
            cropped[first * factor : (first + height) * factor]
            .reshape(height, factor, columns, factor)
            .transpose(0, 2, 1, 3)
        )
        holds_nan = np.isnan(blocks).any(axis=-1) if has_nan else None
        nan_values = None
        if holds_nan is not None and holds_nan.any():
            chosen = blocks[holds_nan]  # a copy, in the blocks' original order
            chosen.partition(exact_kth, axis=-1)
            nan_values = chosen[:, -1]
        blocks.partition(middle, axis=-1)
        out = binned[first : first + height]
        if count % 2:
            np.add(blocks[..., middle], zero, out=out)
        else:
            np.add(blocks[..., :middle].max(axis=-1), zero, out=out)
            with np.errstate(invalid="ignore"):  # -inf and +inf in the middle: NaN, as numpy's median
                out += blocks[..., middle]
            out /= two
        if nan_values is not None:
            out[holds_nan] = nan_values
    return binned


def _median_of_fours(cropped: np.ndarray) -> np.ndarray:
    """:func:`bin_median` by 2 of ``cropped`` (float32, even each way, no NaN): the two middle values of
    each 2 x 2 block by min/max of its four pixel planes, then ``(0 + low + high) / 2`` as numpy's mean."""
    top, bottom = cropped[0::2], cropped[1::2]
    low_top, high_top = np.minimum(top[:, 0::2], top[:, 1::2]), np.maximum(top[:, 0::2], top[:, 1::2])
    low_bottom = np.minimum(bottom[:, 0::2], bottom[:, 1::2])
    high_bottom = np.maximum(bottom[:, 0::2], bottom[:, 1::2])
    larger_low, smaller_high = np.maximum(low_top, low_bottom), np.minimum(high_top, high_bottom)
    binned = np.minimum(larger_low, smaller_high) + np.float32(0.0)
    with np.errstate(invalid="ignore"):  # -inf and +inf in the middle: NaN, as numpy's median
        binned += np.maximum(larger_low, smaller_high)
    binned /= np.float32(2.0)
    return binned


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
    """The parameters of :func:`prepare_views`, as a model records them. ``bin_factor`` 0: chosen per frame;
    ``stamps`` 0: no star-stamp view (one view, :func:`prepare`)."""

    bin_factor: int = 9
    size: int = 224
    stretch: str = "asinh"
    stamps: int = 0

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
        if (
            isinstance(self.stamps, bool)
            or not isinstance(self.stamps, int)
            or not 0 <= self.stamps <= MAX_STAMPS
        ):
            problems.append(f"stamps must be 0 (none) or 1..{MAX_STAMPS} per side, got {self.stamps!r}")
        elif self.stamps and isinstance(self.size, int) and self.size // self.stamps < MIN_STAMP_SIDE:
            problems.append(
                f"{self.stamps} stamps per side of {self.size} px are under {MIN_STAMP_SIDE} px each; "
                "use fewer"
            )
        if problems:
            raise UserError("bad frame preprocessing: " + "; ".join(problems))

    @property
    def views(self) -> int:
        """How many views (input channels) a frame becomes: 1, or 2 with the star stamps."""
        return 2 if self.stamps else 1

    @property
    def version(self) -> str:
        """The preprocessing version these parameters need (version 1 when there are no stamps)."""
        return VERSION if self.stamps else VERSION_WITHOUT_STAMPS

    def apply(self, data: np.ndarray) -> np.ndarray:
        """:func:`prepare` with these parameters: ``[size, size]``. UserError for a spec with star stamps,
        whose input is two views (:meth:`prepare_views`): one of them alone is not what the model learnt."""
        if self.stamps:
            raise UserError(
                f"this preprocessing makes {self.views} views per frame (whole frame and star stamps); "
                "prepare frames with PreprocessSpec.prepare_views"
            )
        return prepare(data, bin_factor=self.bin_factor, size=self.size, stretch=self.stretch)

    def prepare_views(self, data: np.ndarray) -> np.ndarray:
        """:func:`prepare_views` with these parameters: float32 ``[views, size, size]``."""
        return prepare_views(
            data, bin_factor=self.bin_factor, size=self.size, stretch=self.stretch, stamps=self.stamps
        )

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
        stamps = (
            f"; view 2: {self.stamps}x{self.stamps} unbinned {self.size // self.stamps} px stamps of the "
            "brightest binned pixels, each median -> 0, peak -> 1"
            if self.stamps
            else ""
        )
        return (
            f"{self.version}: NaN -> frame median; {binning} (boxcar median, far edges cropped to a "
            "multiple); "
            f"{limits}; centre crop or zero-pad to {self.size}x{self.size}{stamps}"
        )

    def to_metadata(self) -> dict[str, str]:
        """String key/values for a model's metadata (ONNX ``metadata_props``)."""
        return {
            f"{_PREFIX}version": self.version,
            f"{_PREFIX}bin_factor": str(self.bin_factor),
            f"{_PREFIX}size": str(self.size),
            f"{_PREFIX}stretch": self.stretch,
            **({f"{_PREFIX}stamps": str(self.stamps)} if self.stamps else {}),
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
        if version not in {VERSION, VERSION_WITHOUT_STAMPS}:
            raise UserError(
                f"the model was trained on frames prepared by {version}; this code prepares "
                f"{VERSION_WITHOUT_STAMPS} and {VERSION}: retrain the model or serve it with the matching "
                "release"
            )
        stamps_text = metadata.get(f"{_PREFIX}stamps", "0")
        if version == VERSION_WITHOUT_STAMPS and stamps_text != "0":
            raise UserError(f"the model's metadata has {_PREFIX}stamps, which {version} does not know")
        if version == VERSION and stamps_text == "0":
            raise UserError(f"the model's metadata says {version} but has no {_PREFIX}stamps")
        values = {}
        for key in ("bin_factor", "size", "stretch"):
            if f"{_PREFIX}{key}" not in metadata:
                raise UserError(f"the model's metadata has no {_PREFIX}{key}")
            values[key] = metadata[f"{_PREFIX}{key}"]
        try:
            bin_factor, size, stamps = int(values["bin_factor"]), int(values["size"]), int(stamps_text)
        except ValueError as error:
            raise UserError(f"the model's preprocessing metadata is malformed: {error}") from error
        return cls(bin_factor, size, values["stretch"], stamps)
