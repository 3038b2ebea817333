"""Generated telescope frames with known faults: the data the frame classifier learns from and is tested on.

A frame is built as a CCD records it, in electrons, then digitised:

1. **Stars**: uniform random positions (also just off the edges, whose wings reach in), fluxes from a
   power law ``N(>F) ~ F^-0.6`` (faint stars outnumber bright ones as in deep R-band counts), scaled by the
   exposure time. Point sources are spread bilinearly onto the pixel grid.
2. **PSF**: a Moffat profile (``beta`` 2.5-4) whose FWHM is the seeing (0.8-2.2 arcsec) over the pixel
   scale (0.30 arcsec/px, IO:O binned 2x2): 2.7-7.3 px. The whole star field is convolved with it by FFT.
3. **Sky**: a flat background (3-30 e-/px/s) with a gentle natural gradient (at most 3 % across the frame:
   moonlight, twilight).
4. **Faults** (the class):

   - ``good``: none.
   - ``mirror_wobble``: the primary mirror oscillates during the exposure, so every star's image moves
     along one direction (the same for the whole frame): the PSF is convolved with the path
     ``A sin(phase)``. A sinusoid dwells at its turning points, so a wide swing (amplitude ``A`` >~ 1 FWHM)
     shows *doubled* stars and a narrow one *elongated* stars; ``A`` is drawn from 0.7-2.0 FWHM.
   - ``shutter_fault``: the shutter exposes the detector unevenly, multiplying sky and stars (not the
     bias, read noise or cosmic rays) by an illumination map along one detector axis: either a
     ``gradient`` (a slow blade: exposure falls linearly by 35-90 % across the frame) or a ``band`` (a
     stuck blade: a band 12-35 % of the frame wide losing 40-95 % of its light, soft-edged).

5. **Detector**: cosmic rays (sharp 1-6 pixel tracks of 600-8000 e- per pixel, not blurred by the PSF,
   about 1.5 per cm^2 per minute), hot pixels (fixed positions), Poisson noise, saturation at the full
   well (125 000 e-), read noise (8 e-), gain 2 e-/ADU and a bias of 1000 ADU, as 16-bit unsigned ADU.

Reproducible: ``generate_frame(label, seed)`` is a pure function of its arguments. The star field and sky
come from ``seed`` alone, so the same seed with another label shows the same field with another fault:
a controlled comparison. :func:`write_fits` writes a frame as a real CCD file would be (BITPIX 16,
BZERO 32768, observatory keywords, the generator's label and seed in ``SIM*`` keywords), optionally
tile-compressed (``.fz``); :func:`make_dataset` writes the classifier's layout (one folder per class).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from services.errors import UserError

CLASSES: tuple[str, ...] = ("good", "mirror_wobble", "shutter_fault")
#: A 2x2-binned IO:O frame (rows, columns).
FULL_SHAPE = (2048, 2056)
GENERATOR_VERSION = "tessera.frames.synthetic/1"

PIXEL_SCALE = 0.30  # arcsec per (2x2 binned) pixel
PIXEL_SIZE_UM = 30.0  # 15 um pixels binned 2x2, for the cosmic-ray rate
GAIN = 2.0  # e- per ADU
READ_NOISE = 8.0  # e-
BIAS = 1000.0  # ADU
FULL_WELL = 125_000.0  # e-
ADC_MAX = 65_535
#: The SATURATE keyword (ADU): a full well reads FULL_WELL / GAIN + BIAS give or take the read noise, so the
#: level is set 5 read-noise sigmas below it and every pixel of a saturated star reads at least this.
SATURATE = math.floor(FULL_WELL / GAIN + BIAS - 5 * READ_NOISE / GAIN)
STAR_COUNT_SLOPE = 0.6  # N(>F) ~ F^-slope
COSMIC_RAYS_PER_CM2_MIN = 1.5
HOT_PIXEL_FRACTION = 2e-5
_DETECTOR_SEED = 20_200_601  # hot pixels sit at the same places on every frame of one detector shape
_WOBBLE_STEPS = 32
_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Conditions:
    """Everything drawn for one frame (lengths in pixels unless named otherwise)."""

    label: str
    seed: int
    shape: tuple[int, int]
    pixel_scale: float
    exptime: float
    seeing_arcsec: float
    fwhm_px: float
    moffat_beta: float
    sky_rate: float  # e-/px/s
    sky_gradient: float  # natural, fraction across the frame
    stars: int
    wobble_amplitude_px: float  # 0 unless mirror_wobble
    wobble_angle_deg: float  # from the +column axis towards +row
    shutter: str  # "none", "gradient" or "band"
    shutter_axis: int  # 0: the fault varies down the rows, 1: across the columns
    shutter_depth: float  # fraction of light lost at the worst place
    shutter_position: float  # band centre (fraction of the axis); gradient: 0 or 1, the dark end
    shutter_width: float  # band width (fraction of the axis)
    cosmic_rays: int
    date_obs: str
    ra_deg: float
    dec_deg: float
    airmass: float


@dataclass(frozen=True)
class SyntheticFrame:
    """A generated frame: ``data`` uint16 ADU ``[rows, columns]``, what was drawn (``conditions``) and the
    star catalogue ``stars`` float64 ``[N, 3]``: row, column (pixel centres are whole numbers) and flux
    (e-, before any shutter loss)."""

    data: np.ndarray
    conditions: Conditions
    stars: np.ndarray

    @property
    def label(self) -> str:
        """The class: one of :data:`CLASSES`."""
        return self.conditions.label

    @property
    def seed(self) -> int:
        """The seed that regenerates this frame with :func:`generate_frame`."""
        return self.conditions.seed


def generate_frame(
    label: str, seed: int, shape: Sequence[int] = FULL_SHAPE, *, pixel_scale: float = PIXEL_SCALE
) -> SyntheticFrame:
    """One frame of class ``label`` (see the module docstring), reproducible from ``(label, seed, shape)``."""
    if label not in CLASSES:
        raise UserError(f"synthetic frames come in classes {', '.join(CLASSES)}; not {label!r}")
    if len(shape) != 2:
        raise UserError(f"a synthetic frame's shape is (rows, columns), got {tuple(shape)}")
    rows, columns = (int(n) for n in shape)
    if not pixel_scale > 0:
        raise UserError(f"pixel_scale must be > 0 arcsec per pixel, got {pixel_scale!r}")
    if rows < 32 or columns < 32:
        raise UserError(f"synthetic frames need at least 32 x 32 pixels, got {rows} x {columns}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"seed must be a whole number >= 0, got {seed!r}")
    scene = np.random.default_rng([int(seed), 0])
    fault = np.random.default_rng([int(seed), 1 + CLASSES.index(label)])
    noise = np.random.default_rng([int(seed), 9, CLASSES.index(label)])

    exptime = float(scene.choice([15.0, 30.0, 60.0, 120.0]))
    seeing = float(scene.uniform(0.8, 2.2))
    fwhm = seeing / pixel_scale
    beta = float(scene.uniform(2.5, 4.0))
    sky_rate = float(scene.uniform(3.0, 30.0))
    sky_gradient = float(scene.uniform(0.0, 0.03))
    sky_angle = float(scene.uniform(0.0, 2 * np.pi))
    start = _EPOCH + dt.timedelta(seconds=int(scene.integers(0, 365 * 86400)))
    ra, dec = float(scene.uniform(0.0, 360.0)), float(np.degrees(np.arcsin(scene.uniform(-0.5, 1.0))))
    airmass = float(scene.uniform(1.0, 2.0))
    # Drawn last: the catalogue's length depends on the shape, the conditions above do not.
    stars = _star_catalogue(scene, rows, columns, exptime=exptime, margin=int(3 * fwhm))

    amplitude, angle = 0.0, 0.0
    shutter, axis, depth, position, width = "none", 0, 0.0, 0.0, 0.0
    if label == "mirror_wobble":
        amplitude = float(fault.uniform(0.7, 2.0)) * fwhm
        angle = float(fault.uniform(0.0, 180.0))
    elif label == "shutter_fault":
        shutter = str(fault.choice(["gradient", "band"]))
        axis = int(fault.integers(0, 2))
        if shutter == "gradient":
            depth, position = float(fault.uniform(0.35, 0.9)), float(fault.integers(0, 2))
        else:
            depth = float(fault.uniform(0.4, 0.95))
            width = float(fault.uniform(0.12, 0.35))
            position = float(fault.uniform(width / 2, 1 - width / 2))

    cosmic_rate = COSMIC_RAYS_PER_CM2_MIN / 60 * (PIXEL_SIZE_UM * 1e-4) ** 2  # per pixel per second
    cosmic_rays = int(noise.poisson(cosmic_rate * rows * columns * exptime))
    conditions = Conditions(
        label=label,
        seed=int(seed),
        shape=(rows, columns),
        pixel_scale=pixel_scale,
        exptime=exptime,
        seeing_arcsec=seeing,
        fwhm_px=fwhm,
        moffat_beta=beta,
        sky_rate=sky_rate,
        sky_gradient=sky_gradient,
        stars=len(stars),
        wobble_amplitude_px=amplitude,
        wobble_angle_deg=angle,
        shutter=shutter,
        shutter_axis=axis,
        shutter_depth=depth,
        shutter_position=position,
        shutter_width=width,
        cosmic_rays=cosmic_rays,
        date_obs=start.strftime("%Y-%m-%dT%H:%M:%S.000"),
        ra_deg=ra,
        dec_deg=dec,
        airmass=airmass,
    )

    kernel = psf_kernel(fwhm, beta, amplitude, angle)
    light = _convolve(_point_sources(stars, rows, columns, pad=kernel.shape[0] // 2), kernel)
    yy, xx = np.mgrid[0:rows, 0:columns]
    light += (
        sky_rate
        * exptime
        * (
            1.0
            + sky_gradient
            * ((yy / rows - 0.5) * np.sin(sky_angle) + (xx / columns - 0.5) * np.cos(sky_angle))
        )
    )
    light *= illumination(conditions)
    electrons = noise.poisson(light).astype(np.float64)
    electrons += _cosmic_rays(noise, rows, columns, cosmic_rays)
    electrons += _hot_pixels(rows, columns, exptime)
    electrons = np.minimum(electrons, FULL_WELL)
    electrons += noise.normal(0.0, READ_NOISE, electrons.shape)
    adu = np.clip(np.rint(electrons / GAIN + BIAS), 0, ADC_MAX).astype(np.uint16)
    return SyntheticFrame(adu, conditions, stars)


def psf_kernel(fwhm: float, beta: float, amplitude: float = 0.0, angle_deg: float = 0.0) -> np.ndarray:
    """The frame's PSF, normalised to sum 1: a Moffat of ``fwhm`` px and ``beta``, averaged over the
    positions ``amplitude * sin(phase)`` along ``angle_deg`` (from the +column axis towards +row) that a
    wobbling mirror visits in equal times. Odd square, radius 4 FWHM + the swing."""
    radius = math.ceil(4 * fwhm + amplitude)
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float64)
    steps = _WOBBLE_STEPS if amplitude > 0 else 1
    kernel = np.zeros_like(yy)
    direction = math.radians(angle_deg)
    for step in range(steps):  # a few dozen sub-exposures, each a whole-kernel array operation
        shift = amplitude * math.sin(2 * math.pi * (step + 0.5) / steps)
        dy, dx = shift * math.sin(direction), shift * math.cos(direction)
        kernel += (1 + ((yy - dy) ** 2 + (xx - dx) ** 2) / alpha**2) ** -beta
    return kernel / kernel.sum()


def illumination(conditions: Conditions) -> np.ndarray:
    """The shutter's exposure map (1 = fully exposed), float64 ``[rows, columns]``: all ones unless the
    frame has a shutter fault; the map varies along ``shutter_axis`` only."""
    rows, columns = conditions.shape
    if conditions.shutter == "none":
        return np.ones((rows, columns))
    length = (rows, columns)[conditions.shutter_axis]
    t = (np.arange(length) + 0.5) / length
    if conditions.shutter == "gradient":
        along = t if conditions.shutter_position else 1.0 - t  # position 1: the far end is the dark one
        profile = 1.0 - conditions.shutter_depth * along
    else:
        half, edge = conditions.shutter_width / 2, max(2.0 / length, 0.01)
        inside = 0.5 * (
            np.tanh((t - conditions.shutter_position + half) / edge)
            - np.tanh((t - conditions.shutter_position - half) / edge)
        )
        profile = 1.0 - conditions.shutter_depth * inside
    shape = (length, 1) if conditions.shutter_axis == 0 else (1, length)
    return np.broadcast_to(profile.reshape(shape), (rows, columns)).copy()


def _star_catalogue(
    rng: np.random.Generator, rows: int, columns: int, *, exptime: float, margin: int
) -> np.ndarray:
    density = rng.uniform(80.0, 400.0)  # stars per megapixel
    area = (rows + 2 * margin) * (columns + 2 * margin) / 1e6
    count = int(rng.poisson(density * area))
    y = rng.uniform(-margin, rows + margin, count)
    x = rng.uniform(-margin, columns + margin, count)
    rate_min, rate_max = 10.0, 2e5  # e-/s: the faintest worth drawing, and a star that saturates anything
    rate = np.minimum(rate_min * rng.uniform(0.0, 1.0, count) ** (-1 / STAR_COUNT_SLOPE), rate_max)
    return np.column_stack([y, x, rate * exptime])


def _point_sources(stars: np.ndarray, rows: int, columns: int, pad: int) -> np.ndarray:
    """The stars' fluxes spread bilinearly onto a canvas ``pad`` pixels larger than the frame each way."""
    height, width = rows + 2 * pad, columns + 2 * pad
    y, x, flux = stars[:, 0] + pad, stars[:, 1] + pad, stars[:, 2]
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    canvas = np.zeros(height * width)
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        row, column = y0 + dy, x0 + dx
        inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
        canvas += np.bincount(
            row[inside] * width + column[inside], weights=(flux * weight)[inside], minlength=height * width
        )
    return canvas.reshape(height, width)


def _convolve(canvas: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``canvas`` (the frame plus ``r`` pixels each way, ``r`` the kernel's radius) convolved with
    ``kernel`` by FFT, cropped back to the frame. Linear, not circular: the FFT size covers both."""
    radius = kernel.shape[0] // 2
    size = (canvas.shape[0] + kernel.shape[0] - 1, canvas.shape[1] + kernel.shape[1] - 1)
    spectrum = np.fft.rfft2(canvas, size) * np.fft.rfft2(kernel, size)
    full = np.fft.irfft2(spectrum, size)
    frame = full[2 * radius : canvas.shape[0], 2 * radius : canvas.shape[1]]
    return np.maximum(frame, 0.0)  # FFT round-off leaves tiny negatives far from stars


def _cosmic_rays(rng: np.random.Generator, rows: int, columns: int, count: int) -> np.ndarray:
    """Electrons from ``count`` cosmic rays: straight tracks of 1-6 pixels, 600-8000 e- per pixel."""
    hits = np.zeros(rows * columns)
    if count == 0:
        return hits.reshape(rows, columns)
    longest = 6
    length = rng.integers(1, longest + 1, count)
    angle = rng.uniform(0.0, 2 * np.pi, count)
    start_y, start_x = rng.uniform(0, rows, count), rng.uniform(0, columns, count)
    step = np.arange(longest)
    y = np.rint(start_y[:, None] + step * np.sin(angle)[:, None]).astype(np.int64)
    x = np.rint(start_x[:, None] + step * np.cos(angle)[:, None]).astype(np.int64)
    charge = rng.uniform(600.0, 8000.0, (count, longest))
    keep = (step < length[:, None]) & (y >= 0) & (y < rows) & (x >= 0) & (x < columns)
    np.add.at(hits, y[keep] * columns + x[keep], charge[keep])
    return hits.reshape(rows, columns)


def _hot_pixels(rows: int, columns: int, exptime: float) -> np.ndarray:
    """Dark current of the detector's hot pixels (the same pixels on every frame of this shape)."""
    rng = np.random.default_rng([_DETECTOR_SEED, rows, columns])
    count = max(1, round(HOT_PIXEL_FRACTION * rows * columns))
    dark = np.zeros(rows * columns)
    dark[rng.choice(rows * columns, count, replace=False)] = rng.uniform(5.0, 200.0, count) * exptime
    return dark.reshape(rows, columns)


def frame_header(frame: SyntheticFrame) -> fits.Header:
    """Observatory keywords (telescope, detector, exposure, pointing) and the generator's ``SIM*`` ones."""
    c = frame.conditions
    start = dt.datetime.strptime(c.date_obs, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.UTC)
    mjd = (start - dt.datetime(1858, 11, 17, tzinfo=dt.UTC)).total_seconds() / 86400
    header = fits.Header()
    cards: list[tuple[str, object, str]] = [
        ("ORIGIN", "tessera", "generated by services.frames.synthetic"),
        ("TELESCOP", "TESSERA-SIM 2.0m", "simulated 2.0 m robotic telescope"),
        ("INSTRUME", "SIM-IO:O", "simulated optical imager"),
        ("DETECTOR", "SIM-CCD231", "4k x 4k back-illuminated CCD"),
        ("IMAGETYP", "EXPOSE", "science exposure"),
        ("OBJECT", f"FIELD-{c.seed % 100000:05d}", "target name"),
        ("FILTER1", "SDSS-R", "filter"),
        ("DATE-OBS", c.date_obs, "[UTC] exposure start"),
        ("MJD-OBS", round(mjd, 6), "[d] modified Julian date of exposure start"),
        ("EXPTIME", c.exptime, "[s] exposure time"),
        ("RA", _sexagesimal(c.ra_deg / 15, 2), "[h] pointing right ascension (J2000)"),
        ("DEC", _sexagesimal(c.dec_deg, 1), "[deg] pointing declination (J2000)"),
        ("EQUINOX", 2000.0, "equinox of RA/DEC"),
        ("AIRMASS", round(c.airmass, 3), "airmass at exposure start"),
        ("CCDXBIN", 2, "column binning"),
        ("CCDYBIN", 2, "row binning"),
        ("PIXSCALE", c.pixel_scale, "[arcsec/px] binned pixel scale"),
        ("GAIN", GAIN, "[e-/ADU] detector gain"),
        ("RDNOISE", READ_NOISE, "[e-] read noise"),
        ("SATURATE", SATURATE, "[ADU] saturation level"),
        ("SEEING", round(c.seeing_arcsec, 3), "[arcsec] seeing FWHM"),
        ("SIMVER", GENERATOR_VERSION, "frame generator version"),
        ("SIMLABEL", c.label, "generated class of this frame"),
        ("SIMSEED", c.seed, "seed that regenerates this frame"),
        ("SIMFWHM", round(c.fwhm_px, 3), "[px] PSF FWHM"),
        ("SIMBETA", round(c.moffat_beta, 3), "Moffat beta of the PSF"),
        ("SIMSKY", round(c.sky_rate, 3), "[e-/px/s] sky background"),
        ("SIMSTARS", c.stars, "stars drawn (incl. just off the edges)"),
        ("SIMWAMP", round(c.wobble_amplitude_px, 3), "[px] mirror wobble amplitude (0: none)"),
        ("SIMWANG", round(c.wobble_angle_deg, 2), "[deg] wobble direction, +column axis to +row"),
        ("SIMSHUT", c.shutter, "shutter fault: none, gradient or band"),
        ("SIMSAXIS", c.shutter_axis, "shutter fault axis (0 rows, 1 columns)"),
        ("SIMSDEP", round(c.shutter_depth, 3), "fraction of light lost at the worst place"),
        ("SIMSPOS", round(c.shutter_position, 3), "band centre / dark end (fraction of axis)"),
        ("SIMSWID", round(c.shutter_width, 3), "band width (fraction of axis)"),
        ("SIMCRAYS", c.cosmic_rays, "cosmic rays added"),
    ]
    for key, value, comment in cards:
        header[key] = (value, comment)
    return header


def write_fits(
    path: str | Path, frame: SyntheticFrame, *, compress: bool | None = None, float_data: bool = False
) -> Path:
    """Write ``frame`` to ``path`` as a CCD would: unsigned 16-bit ADU (BITPIX 16, BZERO 32768), or float32
    (BITPIX -32) with ``float_data``. ``compress`` (default: ``path`` ends in ``.fz``) writes a
    tile-compressed image extension named SCI (lossless: RICE for integers, GZIP for floats) after an
    empty primary HDU, as fpack does. Returns the path."""
    target = Path(path)
    compress = target.name.endswith(".fz") if compress is None else compress
    data = frame.data.astype(np.float32) if float_data else frame.data
    header = frame_header(frame)
    if compress:
        kind = (
            {"compression_type": "GZIP_2", "quantize_level": 0.0}
            if float_data
            else {"compression_type": "RICE_1"}
        )
        image = fits.CompImageHDU(data=data, header=header, name="SCI", **kind)
        hdus = fits.HDUList([fits.PrimaryHDU(), image])
    else:
        hdus = fits.HDUList([fits.PrimaryHDU(data=data, header=header)])
    target.parent.mkdir(parents=True, exist_ok=True)
    hdus.writeto(target, overwrite=True)
    return target


def make_dataset(
    folder: str | Path,
    per_class: int,
    seed: int,
    shape: Sequence[int] = FULL_SHAPE,
    *,
    classes: Sequence[str] = CLASSES,
    compress: bool = False,
) -> list[Path]:
    """Write ``per_class`` frames of each class under ``folder/<class>/`` (the classifier's dataset layout);
    returns the files in order. Frame ``i`` of class ``k`` has the seed drawn from ``(seed, k, i)``, kept
    in its ``SIMSEED`` keyword."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"per_class must be a whole number >= 1, got {per_class!r}")
    unknown = [name for name in classes if name not in CLASSES]
    if unknown or not classes:
        raise UserError(f"synthetic classes are {', '.join(CLASSES)}; got {list(classes)}")
    root = Path(folder)
    suffix = ".fits.fz" if compress else ".fits"
    written = []
    for name in classes:
        k = CLASSES.index(name)
        for i in range(per_class):
            frame_seed = int(np.random.SeedSequence([int(seed), k, i]).generate_state(1)[0])
            frame = generate_frame(name, frame_seed, shape)
            written.append(write_fits(root / name / f"{name}-{i:04d}{suffix}", frame, compress=compress))
    return written


def _sexagesimal(value: float, digits: int) -> str:
    """``value`` (hours or degrees) as ``[+-]DD:MM:SS.s`` with ``digits`` decimals of seconds (and a sign
    when ``digits`` is 1, as DEC is written). Rounded once, in whole units of the last digit, so 59.999 s
    carries into the next minute instead of printing as 60.00."""
    sign = "-" if value < 0 else ("+" if digits == 1 else "")
    scale = 10**digits
    ticks = round(abs(value) * 3600 * scale)
    whole, rest = divmod(ticks, 3600 * scale)
    minutes, seconds = divmod(rest, 60 * scale)
    return f"{sign}{whole:02d}:{minutes:02d}:{seconds / scale:0{3 + digits}.{digits}f}"
