"""services.frames.prepare and its steps: median binning against a block-by-block reference, missing
values, the stretches, crop/pad, and the spec's round trip through a real ONNX model's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from astropy.visualization import ZScaleInterval
from onnx import TensorProto, helper

from services.errors import UserError
from services.frames import (
    STRETCHES,
    VERSION,
    PreprocessSpec,
    auto_bin_factor,
    bin_median,
    fill_missing,
    fit_square,
    prepare,
    stretch_frame,
    zscale_limits,
)
from services.frames.preprocess import VERSION_WITHOUT_STAMPS, prepare_views, star_stamps
from services.frames.synthetic import generate_frame


def reference_bin(frame: np.ndarray, factor: int) -> np.ndarray:
    """Boxcar median the slow, obvious way: np.median of each factor x factor block in turn."""
    rows, columns = frame.shape[0] // factor, frame.shape[1] // factor
    out = np.empty((rows, columns), np.float64)
    for i in range(rows):
        for j in range(columns):
            out[i, j] = np.median(frame[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor])
    return out


@pytest.mark.parametrize("factor", [2, 3, 4, 9])
def test_binning_matches_the_block_by_block_median(factor: int) -> None:
    rng = np.random.default_rng(factor)
    frame = rng.integers(0, 5000, (41, 57)).astype(np.float32)  # whole numbers: the medians are exact
    binned = bin_median(frame, factor)
    assert binned.shape == (41 // factor, 57 // factor) and binned.dtype == np.float32
    np.testing.assert_array_equal(binned, reference_bin(frame, factor))
    noisy = rng.normal(1000, 30, (41, 57))
    np.testing.assert_allclose(
        bin_median(noisy, factor), reference_bin(noisy.astype(np.float32), factor), rtol=1e-6
    )


def test_binning_keeps_half_values_and_drops_the_far_edges() -> None:
    frame = np.array(
        [
            [1, 2, 10, 20, 99],
            [3, 4, 30, 40, 99],
            [99, 99, 99, 99, 99],
        ],
        np.uint16,
    )
    # Even blocks: the median is the mean of the two middle values, kept as a float (not 2 or 3).
    np.testing.assert_array_equal(bin_median(frame, 2), np.array([[2.5, 25.0]], np.float32))
    assert bin_median(frame, 1).tolist() == frame.astype(np.float32).tolist()
    with pytest.raises(UserError, match=r"a 3 x 5 frame is smaller than one 4 x 4 bin"):
        bin_median(frame, 4)
    with pytest.raises(UserError, match=r"bin factor must be >= 1, got 0"):
        bin_median(frame, 0)


def exact_reference_bin(frame: np.ndarray, factor: int) -> np.ndarray:
    """The binning's definition, bit for bit: np.median of each float32 block in turn (factor 1: a copy)."""
    frame = np.asarray(frame, np.float32)
    if factor == 1:
        return frame.copy()
    rows, columns = frame.shape[0] // factor, frame.shape[1] // factor
    out = np.empty((rows, columns), np.float32)
    with np.errstate(invalid="ignore"):  # +inf and -inf as an even block's middle values
        for i in range(rows):
            for j in range(columns):
                out[i, j] = np.median(frame[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor])
    return out


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shapes, float32, and the same bits everywhere (NaN payloads and signed zeros included)."""
    assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


#: NaNs with different payloads and signs, as a detector pipeline or 0 * inf may leave them.
ODD_NANS = np.array([0x7FC00000, 0x7FC00123, 0xFFC00777, 0xFFC00000], np.uint32).view(np.float32)


@pytest.mark.parametrize("factor", range(1, 17))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binning_is_bit_identical_to_the_block_by_block_median(factor: int, dtype: type) -> None:
    """Every factor 1..16, frames not divisible by it, ties and signed zeros, +-inf, NaNs of several kinds:
    the same bits as np.median of each block (the binning's definition)."""
    rng = np.random.default_rng([factor, np.dtype(dtype).itemsize])
    shapes = [(factor, factor), (2 * factor + 1, 3 * factor + factor // 2 + 1), (3 * factor + 5, factor + 7)]
    for rows, columns in shapes:
        infinite = rng.choice(np.array([-0.0, 0.0, np.inf, -np.inf, 7.0]), (rows, columns))
        frames = [  # (values, share of NaN pixels)
            (rng.normal(1000.0, 30.0, (rows, columns)), 0.0),
            (rng.integers(0, 4, (rows, columns)).astype(np.float64), 0.05),  # ties everywhere
            (rng.choice(np.array([0.0, -0.0, 1.0, -1.0]), (rows, columns)), 0.6),  # whole NaN blocks too
            (infinite, 0.0),
            (infinite, 0.2),
        ]
        for index, (values, holes_share) in enumerate(frames):
            frame: np.ndarray = values.astype(dtype)
            holes = rng.random((rows, columns)) < holes_share
            frame[holes] = rng.choice(ODD_NANS, int(holes.sum())).astype(dtype)
            if index == 4:
                frame = np.asfortranarray(frame)
            assert_same_bits(bin_median(frame, factor), exact_reference_bin(frame, factor))


def test_binning_a_full_frame_in_one_pass_equals_the_reference() -> None:
    """A 2048 x 2056 frame (integer ADU, as read) binned by 9, 8 and 2 (the even paths: partition plus the
    largest lower value, and the four pixel planes) is bit for bit numpy's median over the block axes, with
    and without a NaN."""
    rng = np.random.default_rng(0)
    frame = rng.poisson(1000.0, (2048, 2056)).astype(np.float32)
    for factor in (9, 8, 2):
        rows, columns = 2048 // factor, 2056 // factor
        blocks = frame[: rows * factor, : columns * factor].reshape(rows, factor, columns, factor)
        assert_same_bits(bin_median(frame, factor), np.median(blocks, axis=(1, 3)).astype(np.float32))
    frame[1000, 17] = np.nan
    binned = bin_median(frame, 9)
    assert np.isnan(binned[111, 1]) and int(np.isnan(binned).sum()) == 1
    assert binned[111, 2] == np.median(frame[999:1008, 18:27])


def test_missing_values_become_the_median() -> None:
    frame = np.array([[1.0, np.nan, 3.0], [np.inf, 5.0, -np.inf], [7.0, 8.0, 9.0]])
    filled = fill_missing(frame)
    assert filled.dtype == np.float32 and np.isfinite(filled).all()
    finite_median = np.median([1.0, 3.0, 5.0, 7.0, 8.0, 9.0])
    assert filled[0, 1] == filled[1, 0] == filled[1, 2] == finite_median and filled[2, 2] == 9.0
    with pytest.raises(UserError, match=r"the frame \(2 x 2\) holds no finite pixel value"):
        fill_missing(np.full((2, 2), np.nan))
    with pytest.raises(UserError, match=r"a frame must be a 2-D array, got shape \(4,\)"):
        fill_missing(np.ones(4))


def test_crop_and_pad_to_the_input_size() -> None:
    image = np.arange(300 * 200, dtype=np.float32).reshape(300, 200) + 1
    square = fit_square(image, 224)
    assert square.shape == (224, 224) and square.dtype == np.float32
    # Rows: 300 -> 224, centre crop from row 38. Columns: 200 -> 224, 12 zero columns each side.
    np.testing.assert_array_equal(square[:, 12:212], image[38:262, :])
    assert not square[:, :12].any() and not square[:, 212:].any()
    assert fit_square(image[:200, :200], 200).tolist() == image[:200, :200].tolist()
    assert fit_square(image[:5, :7], 8)[1:6, 0:7].tolist() == image[:5, :7].tolist()


def sky(seed: int = 1, shape: tuple[int, int] = (120, 140)) -> np.ndarray:
    """A noisy background with hot pixels and a few bright stars."""
    rng = np.random.default_rng(seed)
    frame = rng.normal(1000, 20, shape)
    frame[rng.integers(0, shape[0], 20), rng.integers(0, shape[1], 20)] = 60000  # hot pixels, saturation
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for y, x in rng.uniform(10, 100, (6, 2)):
        frame += 5000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8)
    return frame


@pytest.mark.parametrize("how", STRETCHES)
def test_stretches_map_into_zero_one_keeping_order(how: str) -> None:
    frame = sky()
    stretched = stretch_frame(frame, how)
    assert stretched.dtype == np.float32 and stretched.shape == frame.shape
    assert stretched.min() >= 0.0 and stretched.max() <= 1.0
    assert stretched.min() == 0.0 and stretched.max() == 1.0  # the limits lie inside the frame's range
    order = np.argsort(frame, axis=None, kind="stable")
    assert (np.diff(stretched.ravel()[order]) >= 0).all()  # monotonic: brighter never maps darker
    assert not stretch_frame(np.full((8, 8), 3.0), how).any()  # a flat frame is all zeros


def test_percentile_stretches() -> None:
    frame = sky()
    low, high = np.percentile(frame, [0.5, 99.5])
    linear = stretch_frame(frame, "linear")
    np.testing.assert_allclose(linear, np.clip((frame - low) / (high - low), 0, 1), atol=1e-6)
    asinh = stretch_frame(frame, "asinh")
    np.testing.assert_allclose(asinh, np.arcsinh(10 * linear) / np.arcsinh(10), atol=1e-6)
    # The sky gets more of the output range than linear gives it: faint structure stays visible.
    background = np.abs(frame - 1000) < 40
    assert np.ptp(asinh[background]) > 3 * np.ptp(linear[background])
    # A hot pixel does not squash the rest.
    hot = frame.copy()
    hot[0, 0] = 1e9
    assert np.abs(stretch_frame(hot, "linear")[1:] - linear[1:]).max() < 0.01
    with pytest.raises(UserError, match=r"stretch must be one of asinh, linear, zscale, got 'log'"):
        stretch_frame(frame, "log")


def test_zscale_agrees_with_astropy() -> None:
    for seed in range(3):
        frame = sky(seed)
        ours = np.array(zscale_limits(frame))
        theirs = np.array(ZScaleInterval().get_limits(frame))
        np.testing.assert_allclose(ours, theirs, atol=0.01 * (theirs[1] - theirs[0]))
        assert frame.min() <= ours[0] < np.median(frame) < ours[1] <= frame.max()


def test_auto_bin_factor() -> None:
    assert auto_bin_factor((2048, 2056), 224) == 9  # 2x2-binned IO:O, as imbin -b 9
    assert auto_bin_factor((4096, 4112), 224) == 18  # the same field unbinned
    assert auto_bin_factor((512, 512), 224) == 2
    assert auto_bin_factor((100, 300), 224) == 1
    assert auto_bin_factor((100_000, 100_000), 32) == 64  # capped


@pytest.mark.parametrize("how", STRETCHES)
def test_prepare_makes_the_network_input(how: str) -> None:
    frame = sky(shape=(2048 // 8, 2056 // 8)).astype(np.float32)
    frame[3, 4] = np.nan
    prepared = prepare(frame, bin_factor=0, size=224 // 8 * 2, stretch=how)
    assert prepared.shape == (56, 56) and prepared.dtype == np.float32
    assert np.isfinite(prepared).all() and prepared.min() >= 0.0 and prepared.max() <= 1.0
    # The same as its steps, done by hand.
    steps = fit_square(stretch_frame(bin_median(fill_missing(frame), 4), how), 56)
    np.testing.assert_array_equal(prepared, steps)
    assert PreprocessSpec(0, 56, how).apply(frame).tolist() == prepared.tolist()
    # Integer frames (as read from 16-bit files) give the same as their float values.
    whole = np.rint(np.nan_to_num(frame, nan=1000)).astype(np.uint16)
    np.testing.assert_array_equal(prepare(whole, size=56), prepare(whole.astype(np.float64), size=56))


def test_prepare_refuses_bad_parameters_and_empty_frames() -> None:
    with pytest.raises(UserError, match=r"bin_factor must be 0 \(per frame\) or 1..64, got 65; size must"):
        prepare(np.ones((10, 10)), bin_factor=65, size=0)
    with pytest.raises(UserError, match=r"stretch must be one of asinh, linear, zscale, got 'sqrt'"):
        PreprocessSpec(stretch="sqrt")
    with pytest.raises(UserError, match=r"bin_factor must be a whole number, got True"):
        PreprocessSpec(bin_factor=True)
    with pytest.raises(UserError, match=r"holds no finite pixel value"):
        prepare(np.full((20, 20), np.nan), size=8)


def onnx_with_metadata(path: Path, metadata: dict[str, str]) -> Path:
    """A one-node ONNX model (Identity) carrying ``metadata`` as metadata_props, saved to ``path``."""
    frames = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, "S", "S"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, "S", "S"])
    graph = helper.make_graph([helper.make_node("Identity", ["frames"], ["logits"])], "g", [frames], [logits])
    model = helper.make_model(graph)
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(0, 32, "zscale"),
        PreprocessSpec(3, 96, "linear"),
        PreprocessSpec(0, 224, "asinh", 4),
    ],
)
def test_spec_round_trips_through_onnx_metadata(tmp_path: Path, spec: PreprocessSpec) -> None:
    written = spec.to_metadata()
    # Without stamps, the whole-frame view is version 1's: written as such, so older releases serve it.
    assert written["tessera.frames.version"] == (VERSION if spec.stamps else VERSION_WITHOUT_STAMPS)
    assert ("tessera.frames.stamps" in written) == bool(spec.stamps) and spec.views == 1 + bool(spec.stamps)
    assert written["tessera.frames.description"] == spec.describe() and spec.stretch in spec.describe()
    path = onnx_with_metadata(tmp_path / "m.onnx", {"tessera.task": "classifier", **written})
    read = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert PreprocessSpec.from_metadata(read) == spec


def test_spec_metadata_errors() -> None:
    good = PreprocessSpec(9, 224, "asinh").to_metadata()
    no_size = {key: value for key, value in good.items() if key != "tessera.frames.size"}
    cases: list[tuple[dict[str, str], str]] = [
        ({}, r"has no tessera.frames.version: it does not record its preprocessing"),
        (
            {**good, "tessera.frames.version": "tessera.frames.preprocess/0"},
            r"trained on frames prepared by tessera.frames.preprocess/0; this code prepares "
            r"tessera.frames.preprocess/1 and tessera.frames.preprocess/2: retrain the model",
        ),
        ({**good, "tessera.frames.stamps": "4"}, r"has tessera.frames.stamps, which .*/1 does not know"),
        ({**good, "tessera.frames.version": VERSION}, r"says .*/2 but has no tessera.frames.stamps"),
        ({**good, "tessera.frames.version": VERSION, "tessera.frames.stamps": "x"}, r"malformed"),
        ({**good, "tessera.frames.version": VERSION, "tessera.frames.stamps": "40"}, r"stamps must be"),
        (no_size, r"has no tessera.frames.size"),
        ({**good, "tessera.frames.bin_factor": "nine"}, r"preprocessing metadata is malformed"),
        ({**good, "tessera.frames.stretch": "log"}, r"stretch must be one of"),
    ]
    for metadata, message in cases:
        with pytest.raises(UserError, match=message):
            PreprocessSpec.from_metadata(metadata)


def test_star_stamps_cut_out_the_brightest_stars_unbinned() -> None:
    """Stamps around the brightest binned pixels, brightest first, spaced a stamp apart, whole stamps inside
    the frame, each scaled median -> 0, peak -> 1, unbinned (a hot pixel kept); cells with no star stay 0."""
    frame = np.full((90, 90), 100.0, np.float32)
    frame[39:45, 39:45] = 1100.0  # the brightest star: binned pixels (13..14, 13..14), the first in order
    frame[41, 42] = 5000.0  # with a hot pixel, which binning ignores and the stamp keeps
    frame[45:48, 48:51] = 900.0  # the next brightest, but within a stamp of the first: skipped
    frame[69:75, 9:15] = 600.0  # the second star: binned (23, 3), raw centre (70, 10)
    frame[0:6, 0:6] = 9000.0  # the brightest of all, but its stamp would leave the frame
    frame[30, 75] = 1e6  # a cosmic ray: gone after binning
    stamps = star_stamps(frame, bin_median(frame, 3), 3, 32, 2)  # 2 x 2 stamps of 16 px
    assert stamps.shape == (32, 32) and stamps.dtype == np.float32
    first, second = frame[32:48, 32:48], frame[62:78, 2:18]  # raw centres (40, 40) and (70, 10)
    np.testing.assert_allclose(stamps[:16, :16], (first - 100.0) / 4900.0, rtol=1e-6)
    np.testing.assert_allclose(stamps[:16, 16:], (second - 100.0) / 500.0, rtol=1e-6)
    # A 20 x 20 frame has room for one 16 px stamp only (binned pixel (3, 3), raw centre (10, 10)).
    small = np.full((20, 20), 10.0, np.float32)
    small[9:12, 9:12] = 20.0
    one = star_stamps(small, bin_median(small, 3), 3, 32, 2)
    np.testing.assert_array_equal(one[:16, :16], (small[2:18, 2:18] - 10.0) / 10.0)
    assert not one[:16, 16:].any() and not one[16:].any()
    with pytest.raises(UserError, match=r"under 8 px each"):
        PreprocessSpec(9, 32, "asinh", 5)


def test_prepare_views_stacks_the_whole_frame_and_the_stamps() -> None:
    """On a generated 2048-px frame: view 0 is prepare()'s, view 1 the star stamps; a spec with stamps
    refuses to make the whole-frame view alone; a mirror wobble shows as elongated stamps."""
    good, wobble = (generate_frame(label, 5, (2048, 2048)).data for label in ("good", "mirror_wobble"))
    spec = PreprocessSpec(0, 224, "asinh", 4)
    views = spec.prepare_views(good)
    assert views.shape == (2, 224, 224) and views.dtype == np.float32 and spec.views == 2
    np.testing.assert_array_equal(views[0], prepare(good, bin_factor=0))
    np.testing.assert_array_equal(views, prepare_views(good, bin_factor=0, stamps=4))
    assert prepare_views(good).shape == (1, 224, 224)
    with pytest.raises(UserError, match=r"2 views per frame"):
        spec.apply(good)

    def spread(stamps: np.ndarray) -> float:
        """How far each stamp's light reaches: cells above half their peak, summed over the grid."""
        return float((stamps > 0.5).sum())

    assert spread(spec.prepare_views(wobble)[1]) > 1.5 * spread(views[1])
