"""services.frames.synthetic: reproducible frames that look like a CCD's, whose faults are measurable.

The checks measure the pixels as an astronomer would (star shapes from second moments, the sky level per
strip of the detector, noise from the pixel scatter) and compare with what the generator drew; a simple
rule on two of those measurements sorts every frame of a few dozen into its class. (Over 100 seeds, good
frames measured elongations 1.00-1.15 and wobbling ones 1.30-3.2; the sky dropped by at most 4 % across good
frames and by 38-92 % across shutter faults.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.errors import UserError
from services.frames import CLASSES, generate_frame, make_dataset, read_frame, write_fits
from services.frames.synthetic import BIAS, GAIN, READ_NOISE, SATURATE, SyntheticFrame, psf_kernel

SHAPE = (768, 768)
SEEDS = range(8)


def isolated_stars(frame: SyntheticFrame, radius: int, count: int = 7) -> list[tuple[int, int]]:
    """Pixel centres of the brightest catalogue stars with no neighbour over 3 % of their flux within two
    radii, away from the edges, unsaturated and peaking over 12 sigma above the sky: stars whose shape can
    be measured alone."""
    stars = frame.stars
    rows, columns = frame.data.shape
    sky = np.median(frame.data)
    sigma = 1.4826 * np.median(np.abs(frame.data - sky))
    chosen: list[tuple[int, int]] = []
    for y, x, flux in stars[np.argsort(-stars[:, 2])]:
        row, column = round(y), round(x)
        if not (radius <= row < rows - radius and radius <= column < columns - radius):
            continue
        near = (np.abs(stars[:, 0] - y) < 2 * radius) & (np.abs(stars[:, 1] - x) < 2 * radius)
        if (near & (stars[:, 2] > 0.03 * flux)).sum() > 1:
            continue
        peak = frame.data[row - radius : row + radius + 1, column - radius : column + radius + 1].max()
        if peak >= SATURATE or peak - sky < 12 * sigma:
            continue
        chosen.append((row, column))
        if len(chosen) == count:
            break
    return chosen


def star_shapes(frame: SyntheticFrame) -> np.ndarray:
    """``[N, 2]``: elongation (major / minor axis, from flux-weighted second moments of the pixels over 3
    sigma above the sky) and the major axis's direction (degrees from +column towards +row, 0-180) of the
    isolated stars. The size of the cut-out comes from the header's seeing, as a pipeline would know it."""
    data = frame.data.astype(np.float64)
    sky = np.median(data)
    sigma = 1.4826 * np.median(np.abs(data - sky))
    radius = int(np.ceil(3 * frame.conditions.seeing_arcsec / frame.conditions.pixel_scale))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    shapes = []
    for row, column in isolated_stars(frame, radius):
        cut = data[row - radius : row + radius + 1, column - radius : column + radius + 1] - sky
        weight = np.where(cut > 3 * sigma, cut, 0.0)
        if np.count_nonzero(weight) < 9:
            continue  # too faint to have a shape
        total = weight.sum()
        cy, cx = (weight * yy).sum() / total, (weight * xx).sum() / total
        myy = (weight * (yy - cy) ** 2).sum() / total
        mxx = (weight * (xx - cx) ** 2).sum() / total
        mxy = (weight * (yy - cy) * (xx - cx)).sum() / total
        minor, major = np.linalg.eigvalsh([[myy, mxy], [mxy, mxx]])
        shapes.append((np.sqrt(major / minor), np.degrees(0.5 * np.arctan2(2 * mxy, mxx - myy)) % 180))
    assert len(shapes) >= 2, "too few isolated stars to measure"
    return np.array(shapes)


def sky_profile(data: np.ndarray, axis: int, strips: int = 32) -> np.ndarray:
    """The sky level above the bias (median, so stars do not count) in ``strips`` strips along ``axis``."""
    along = np.moveaxis(data.astype(np.float64) - BIAS, axis, 0)
    width = along.shape[0] // strips
    return np.array([np.median(along[i * width : (i + 1) * width]) for i in range(strips)])


def illumination_drop(data: np.ndarray) -> tuple[float, int]:
    """The largest fractional drop of the sky level across the frame (1 - darkest / brightest strip), and
    the axis it runs along."""
    drops = [1.0 - p.min() / p.max() for p in (sky_profile(data, 0), sky_profile(data, 1))]
    return max(drops), int(np.argmax(drops))


def angle_between(a: float, b: float) -> float:
    """Degrees between two axis directions (modulo 180)."""
    return abs((a - b + 90) % 180 - 90)


def test_reproducible_from_the_seed() -> None:
    first = generate_frame("mirror_wobble", 12, (96, 128))
    again = generate_frame("mirror_wobble", 12, (96, 128))
    assert first.data.dtype == np.uint16 and first.data.shape == (96, 128)
    np.testing.assert_array_equal(first.data, again.data)
    np.testing.assert_array_equal(first.stars, again.stars)
    assert first.conditions == again.conditions and (first.label, first.seed) == ("mirror_wobble", 12)
    assert not np.array_equal(generate_frame("mirror_wobble", 13, (96, 128)).data, first.data)
    # Another class from the same seed: the same sky and stars, with another fault.
    good = generate_frame("good", 12, (96, 128))
    np.testing.assert_array_equal(good.stars, first.stars)
    assert good.conditions.seeing_arcsec == first.conditions.seeing_arcsec
    assert good.conditions.wobble_amplitude_px == 0.0 < first.conditions.wobble_amplitude_px


def test_sky_noise_and_saturation_look_like_a_ccd() -> None:
    for seed in SEEDS:
        frame = generate_frame("good", seed, SHAPE)
        c = frame.conditions
        data = frame.data.astype(np.float64)
        sky_electrons = c.sky_rate * c.exptime
        level = np.median(data)
        assert level - BIAS == pytest.approx(sky_electrons / GAIN, rel=0.02, abs=1.0)
        # Poisson noise of the sky plus read noise, in ADU: measured on differences of neighbouring pixels
        # (clipped at 5 sigma), which the slowly varying sky and the stars' wings hardly touch.
        expected = np.sqrt(sky_electrons + READ_NOISE**2) / GAIN
        steps = np.diff(data, axis=1).ravel()
        noise = steps[np.abs(steps) < 5 * np.sqrt(2) * expected].std() / np.sqrt(2)
        assert noise == pytest.approx(expected, rel=0.03), seed
        # Stars whose peak exceeds the full well are clipped at SATURATE (give or take the read noise).
        assert data.max() <= SATURATE + 10 * READ_NOISE / GAIN
        peak = psf_kernel(c.fwhm_px, c.moffat_beta).max()
        bright = [s for s in frame.stars if s[2] * peak > 2 * 125_000]
        for y, x, _ in bright:
            row, column = round(y), round(x)
            if 0 <= row < SHAPE[0] and 0 <= column < SHAPE[1]:
                assert data[row, column] >= SATURATE


def test_seeing_sets_the_star_size() -> None:
    drawn, measured = [], []
    for seed in SEEDS:
        frame = generate_frame("good", seed, SHAPE)
        data = frame.data.astype(np.float64) - np.median(frame.data)
        radius = int(np.ceil(3 * frame.conditions.fwhm_px))
        widths = []
        for row, column in isolated_stars(frame, radius):
            cut = data[row - radius : row + radius + 1, column - radius : column + radius + 1]
            widths.append(2 * np.sqrt((cut > cut.max() / 2).sum() / np.pi))  # from the half-maximum area
        drawn.append(frame.conditions.fwhm_px)
        measured.append(float(np.median(widths)))
    np.testing.assert_allclose(measured, drawn, rtol=0.15)
    assert np.corrcoef(drawn, measured)[0, 1] > 0.95
    assert np.ptp(drawn) > 2.0  # the seeing really varies from frame to frame


def test_mirror_wobble_elongates_stars_along_one_direction() -> None:
    for seed in SEEDS:
        good = star_shapes(generate_frame("good", seed, SHAPE))
        wobble_frame = generate_frame("mirror_wobble", seed, SHAPE)
        wobble = star_shapes(wobble_frame)
        assert np.median(good[:, 0]) < 1.2, seed  # round stars
        assert np.median(wobble[:, 0]) > 1.25, seed  # the same stars, drawn out
        # The stars point the way the mirror moved (a cosmic ray on one may turn it: most, not all).
        direction = wobble_frame.conditions.wobble_angle_deg
        off = [angle_between(a, direction) for a in wobble[:, 1]]
        assert np.median(off) < 3 and np.mean(np.less(off, 8)) >= 0.75, (seed, wobble[:, 1], direction)


def test_wide_wobble_doubles_stars() -> None:
    """A sinusoid dwells at its ends: a swing of 2 FWHM shows two peaks with a dip between them."""
    kernel = psf_kernel(4.0, 3.0, amplitude=8.0, angle_deg=0.0)
    centre = kernel.shape[0] // 2
    cut = kernel[centre, centre - 12 : centre + 13]
    peaks = [i for i in range(1, 24) if cut[i] > cut[i - 1] and cut[i] >= cut[i + 1]]
    assert len(peaks) == 2 and cut[12] < 0.8 * cut[peaks].min()
    assert psf_kernel(4.0, 3.0).sum() == pytest.approx(1.0) and kernel.sum() == pytest.approx(1.0)


def test_shutter_fault_dims_the_frame_along_one_axis() -> None:
    for seed in SEEDS:
        c = generate_frame("shutter_fault", seed, SHAPE).conditions
        data = generate_frame("shutter_fault", seed, SHAPE).data
        drop, axis = illumination_drop(data)
        assert axis == c.shutter_axis and drop == pytest.approx(c.shutter_depth, abs=0.06), seed
        profile = sky_profile(data, c.shutter_axis)
        darkest = (np.argmin(profile) + 0.5) / len(profile)
        if c.shutter == "gradient":
            assert darkest == pytest.approx(c.shutter_position, abs=0.05)  # the end the blade reached last
            assert np.all(np.diff(profile) < 0) if c.shutter_position else np.all(np.diff(profile) > 0)
        else:
            assert abs(darkest - c.shutter_position) <= c.shutter_width / 2 + 1 / 32
        assert illumination_drop(generate_frame("good", seed, SHAPE).data)[0] < 0.05  # natural sky: flat


def test_a_simple_rule_tells_the_classes_apart() -> None:
    """Two measurements, two thresholds: elongated stars are a wobble, a dimmed strip a shutter fault."""
    for seed in range(100, 100 + len(SEEDS)):
        for label in CLASSES:
            frame = generate_frame(label, seed, SHAPE)
            drop, _ = illumination_drop(frame.data)
            if drop > 0.2:
                guess = "shutter_fault"
            else:
                elongation = float(np.median(star_shapes(frame)[:, 0]))
                guess = "mirror_wobble" if elongation > 1.2 else "good"
            assert guess == label, (seed, label, drop)


def test_written_like_a_ccd_file(tmp_path: Path) -> None:
    frame = generate_frame("shutter_fault", 4, (64, 80))
    path = write_fits(tmp_path / "frame.fits", frame)
    with fits.open(path, do_not_scale_image_data=True) as hdus:
        header = hdus[0].header
        assert (header["BITPIX"], header["BZERO"], header["BSCALE"]) == (16, 32768, 1)
        assert hdus[0].data.dtype.kind == "i"  # stored signed, as FITS requires
    assert header["SIMLABEL"] == "shutter_fault" and header["SIMSEED"] == 4
    assert header["EXPTIME"] == frame.conditions.exptime and header["SATURATE"] == SATURATE
    assert header["SIMSHUT"] == frame.conditions.shutter and header["DATE-OBS"].startswith("2024-")
    np.testing.assert_array_equal(read_frame(path).data, frame.data)
    compressed = write_fits(tmp_path / "frame.fits.fz", frame)
    read = read_frame(compressed)
    assert read.hdu_name == "SCI" and read.header["SIMSEED"] == 4
    np.testing.assert_array_equal(read.data, frame.data)  # lossless
    floats = write_fits(tmp_path / "float.fits.fz", frame, float_data=True)
    np.testing.assert_array_equal(read_frame(floats).data, frame.data)


def test_dataset_layout_and_seeds(tmp_path: Path) -> None:
    files = make_dataset(tmp_path, 2, seed=5, shape=(48, 48), classes=("good", "shutter_fault"))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "good/good-0000.fits",
        "good/good-0001.fits",
        "shutter_fault/shutter_fault-0000.fits",
        "shutter_fault/shutter_fault-0001.fits",
    ]
    seeds = [read_frame(f).header["SIMSEED"] for f in files]
    assert len(set(seeds)) == 4
    # The seed in the header regenerates the frame.
    np.testing.assert_array_equal(
        read_frame(files[3]).data, generate_frame("shutter_fault", seeds[3], (48, 48)).data
    )
    again = make_dataset(tmp_path / "again", 2, seed=5, shape=(48, 48), classes=("good", "shutter_fault"))
    assert [read_frame(f).header["SIMSEED"] for f in again] == seeds
    assert (
        make_dataset(tmp_path / "fz", 1, seed=5, shape=(48, 48), compress=True)[0].name == "good-0000.fits.fz"
    )


def test_bad_requests() -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"label": "cloudy"}, r"classes good, mirror_wobble, shutter_fault; not 'cloudy'"),
        ({"shape": (16, 64)}, r"at least 32 x 32 pixels, got 16 x 64"),
        ({"shape": (64, 64, 3)}, r"shape is \(rows, columns\), got \(64, 64, 3\)"),
        ({"seed": -1}, r"seed must be a whole number >= 0, got -1"),
        ({"pixel_scale": 0.0}, r"pixel_scale must be > 0"),
    ]
    for change, message in cases:
        arguments: dict[str, object] = {"label": "good", "seed": 1, "shape": (64, 64), **change}
        pixel_scale = arguments.pop("pixel_scale", 0.3)
        with pytest.raises(UserError, match=message):
            generate_frame(**arguments, pixel_scale=pixel_scale)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"per_class must be a whole number >= 1"):
        make_dataset("unused", 0, seed=1)
    with pytest.raises(UserError, match=r"synthetic classes are good, mirror_wobble, shutter_fault"):
        make_dataset("unused", 1, seed=1, classes=("good", "cloudy"))
