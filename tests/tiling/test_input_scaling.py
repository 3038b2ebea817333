"""InputScaling: each dtype to [0, 1] (or the model's range) by a stated or documented rule, never a guess;
nodata to 0; bands to model channels."""

from __future__ import annotations

import numpy as np
import pytest

from services.errors import UserError
from services.tiling.batches import _all_nodata, native_nodata
from services.tiling.scaling import InputScaling, ScalingRule, parse_value_range


def test_uint8_divides_by_255() -> None:
    raw = np.array([[[0, 1, 128, 255]]], dtype=np.uint8)
    out = InputScaling().apply(raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, raw / 255.0, rtol=1e-7)


def test_uint16_divides_by_65535_unless_a_range_is_given() -> None:
    raw = np.array([[[0, 2048, 4095, 65535]]], dtype=np.uint16)
    np.testing.assert_allclose(InputScaling().apply(raw), raw / 65535.0, rtol=1e-7)
    twelve_bit = InputScaling(value_range=(0, 4095)).apply(raw)
    np.testing.assert_allclose(twelve_bit, [[[0.0, 2048 / 4095, 1.0, 1.0]]], rtol=1e-6)  # clipped above 4095
    offset = InputScaling(value_range=(1000, 3000)).apply(np.array([0, 1000, 2000, 5000], dtype=np.uint16))
    np.testing.assert_allclose(offset, [0.0, 0.0, 0.5, 1.0])


def test_floats_scale_by_a_stated_range_and_nan_becomes_zero() -> None:
    raw = np.array([-0.5, 0.0, 0.25, 1.0, 7.0, np.nan], dtype=np.float32)
    unit = InputScaling(value_range=(0, 1)).apply(raw)
    np.testing.assert_array_equal(unit, [0.0, 0.0, 0.25, 1.0, 1.0, 0.0])
    reflectance = np.array([0.0, 5000.0, 10000.0], dtype=np.float64)
    np.testing.assert_allclose(InputScaling(value_range=(0, 10000)).apply(reflectance), [0.0, 0.5, 1.0])
    unchanged = InputScaling().with_rule(ScalingRule(mode="none")).apply(raw)
    np.testing.assert_array_equal(unchanged, [-0.5, 0.0, 0.25, 1.0, 7.0, 0.0])


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "int8", "int32"])
def test_floats_and_signed_pixels_without_a_rule_are_refused_with_the_fix(dtype: str) -> None:
    with pytest.raises(UserError) as refused:
        InputScaling().apply(np.zeros(4, dtype=dtype))
    message = str(refused.value)
    assert f"the image is {dtype}" in message
    assert "tessera.input_scale 1/255" in message  # what the model takes
    assert '"scaling": {"mode": "range", "min": LOW, "max": HIGH}' in message  # how to fix it
    with pytest.raises(UserError, match=f"the image is {dtype} with 3 bands"):
        InputScaling().for_image(dtype, 3)


def test_signed_integers_scale_by_a_stated_range() -> None:
    raw = np.array([-1000, -500, 0, 1000, 2000], dtype=np.int16)
    scaling = InputScaling().with_rule(ScalingRule.parse({"mode": "range", "min": -1000, "max": 1000}))
    np.testing.assert_allclose(scaling.apply(raw), [0.0, 0.25, 0.5, 1.0, 1.0], rtol=1e-6)


def test_a_declared_bit_depth_is_the_range_of_unsigned_pixels() -> None:
    scaling = InputScaling().for_image("uint16", 3, nbits=12)
    assert scaling.value_range == (0.0, 4095.0)
    raw = np.array([0, 2048, 4095, 5000], dtype=np.uint16)
    np.testing.assert_allclose(scaling.apply(raw), [0.0, 2048 / 4095, 1.0, 1.0], rtol=1e-6)
    with pytest.raises(UserError, match=r"no declared bit depth.*--scale 0,65535.*--scale 0,4095"):
        InputScaling().for_image("uint16", 3)  # undeclared: 12-bit or 16-bit? stated, never guessed
    assert InputScaling(value_range=(0, 65535)).for_image("uint16", 3).value_range == (0, 65535)
    assert InputScaling().for_image("uint16", 3, nbits=16).value_range is None
    stated = InputScaling(value_range=(0, 2047)).for_image("uint16", 3, nbits=12)
    assert stated.value_range == (0, 2047)  # a stated range wins over the file's bit depth


def test_rules_parse_from_documents_and_text() -> None:
    assert ScalingRule.parse(None) is None
    assert ScalingRule.parse({"mode": "range", "min": 0, "max": 4095}) == ScalingRule("range", 0.0, 4095.0)
    assert ScalingRule.parse("0,4095") == ScalingRule("range", 0.0, 4095.0)
    assert ScalingRule.parse("none") == ScalingRule(mode="none")
    assert ScalingRule.parse("replicate") == ScalingRule(bands="replicate")
    assert ScalingRule.parse({"bands": [3, 2, 1]}) == ScalingRule(bands=(3, 2, 1))
    with pytest.raises(UserError, match="must be one of"):
        ScalingRule.parse({"mode": "stretch"})
    with pytest.raises(UserError, match='needs "min" < "max"'):
        ScalingRule.parse({"mode": "range", "min": 5})
    with pytest.raises(UserError, match="go with scaling mode"):
        ScalingRule.parse({"mode": "none", "max": 5})
    with pytest.raises(UserError, match="unknown"):
        ScalingRule.parse({"mode": "none", "gamma": 2})
    with pytest.raises(UserError, match="bands must be"):
        ScalingRule.parse({"bands": "grey"})
    with pytest.raises(UserError, match="must be a number"):
        ScalingRule.parse({"mode": "range", "min": "0", "max": 1})


def test_a_rule_wins_over_the_model_metadata() -> None:
    metadata = {"tessera.input_scale": "1", "tessera.input_range": "0,4095"}
    ranged = InputScaling.from_metadata(metadata, channels=3, rule=ScalingRule("range", 0.0, 255.0))
    assert ranged.value_range == (0.0, 255.0) and ranged.output_scale == 255.0
    np.testing.assert_allclose(ranged.apply(np.array([0.0, 127.5, 255.0])), [0.0, 127.5, 255.0])
    unchanged = InputScaling.from_metadata(metadata, channels=3, rule=ScalingRule(mode="none"))
    assert unchanged.value_range is None and unchanged.passthrough
    grey = InputScaling.from_metadata({}, channels=3, rule=ScalingRule(bands="replicate"))
    assert grey.band_indexes(1) == (1, 1, 1)
    assert InputScaling.from_metadata({}, channels=3).with_rule(None) == InputScaling(channels=3)


def test_nodata_pixels_become_zero_whatever_their_value() -> None:
    raw = np.array([255, 10, 255, 0], dtype=np.uint8)
    np.testing.assert_allclose(InputScaling().apply(raw, nodata=255), [0.0, 10 / 255, 0.0, 0.0], rtol=1e-6)
    raw16 = np.array([65535, 3, 0], dtype=np.uint16)
    np.testing.assert_allclose(
        InputScaling(value_range=(0, 10)).apply(raw16, nodata=65535), [0.0, 0.3, 0.0], rtol=1e-6
    )


def test_model_metadata_sets_the_output_scale_and_range() -> None:
    raw = np.array([0, 51, 255], dtype=np.uint8)
    raw_pixels = InputScaling.from_metadata({"tessera.input_scale": "1"}, channels=3)
    np.testing.assert_allclose(raw_pixels.apply(raw), [0.0, 51.0, 255.0], rtol=1e-6)
    unit = InputScaling.from_metadata({"tessera.input_scale": "1/255"}, channels=3)
    np.testing.assert_allclose(unit.apply(raw), [0.0, 0.2, 1.0], rtol=1e-6)
    ranged = InputScaling.from_metadata({"tessera.input_range": "0,4095"}, channels=1)
    assert ranged.value_range == (0.0, 4095.0) and ranged.channels == 1
    request_wins = InputScaling.from_metadata(
        {"tessera.input_range": "0,4095"}, channels=1, value_range=(0, 255)
    )
    assert request_wins.value_range == (0, 255)
    with pytest.raises(UserError, match=r"tessera\.input_scale"):
        InputScaling.from_metadata({"tessera.input_scale": "a lot"}, channels=3)
    with pytest.raises(UserError, match="low,high"):
        parse_value_range("4095")


@pytest.mark.parametrize(
    ("band_count", "channels", "bands", "expected"),
    [
        (1, 3, (1, 1, 1), (1, 1, 1)),  # grey replicated to RGB, as asked
        (3, 3, None, (1, 2, 3)),
        (4, 3, None, (1, 2, 3)),  # RGBA or RGB+NIR: first three
        (4, 3, (4, 3, 2), (4, 3, 2)),  # false colour chosen by the request
        (4, 1, None, (1,)),
        (8, 4, (8, 1, 1, 2), (8, 1, 1, 2)),
    ],
)
def test_bands_feed_the_model_channels(
    band_count: int, channels: int, bands: tuple[int, ...] | None, expected: tuple[int, ...]
) -> None:
    assert InputScaling(channels=channels).band_indexes(band_count, bands) == expected


def test_a_single_band_feeds_several_channels_only_when_asked() -> None:
    with pytest.raises(UserError) as refused:
        InputScaling(channels=3).for_image("uint8", 1)
    message = str(refused.value)
    assert "the image has 1 band but the model takes 3 channels" in message
    assert '"scaling": {"bands": "replicate"}' in message
    assert InputScaling(channels=3, replicate=True).band_indexes(1) == (1, 1, 1)
    assert InputScaling(channels=1).band_indexes(1) == (1,)  # a grey model needs no rule


def test_band_mismatches_are_user_errors() -> None:
    with pytest.raises(UserError, match="choose 3 bands"):
        InputScaling(channels=3).band_indexes(2)
    with pytest.raises(UserError, match=r"bands \[5\] do not exist"):
        InputScaling(channels=3).band_indexes(4, (1, 2, 5))
    with pytest.raises(UserError, match="one band per model channel"):
        InputScaling(channels=3).band_indexes(4, (1, 2))
    with pytest.raises(UserError, match="high > low"):
        InputScaling(value_range=(10, 10))


def test_nodata_in_the_native_dtype_matches_what_the_float_comparison_did() -> None:
    assert native_nodata(0.0, "uint8") == 0 and isinstance(native_nodata(0.0, "uint8"), np.uint8)
    assert isinstance(native_nodata(-1.0, "uint8"), float)  # not a uint8 value: matches no pixel
    assert isinstance(native_nodata(7.5, "uint16"), float)
    raw = np.zeros((3, 4, 5), np.uint8)
    assert _all_nodata(raw, native_nodata(0.0, "uint8"))
    raw[2, 3, 4] = 1
    assert not _all_nodata(raw, native_nodata(0.0, "uint8"))
    assert not _all_nodata(raw, native_nodata(-1.0, "uint8"))
    raw[0, 0, 0] = 9  # the first pixel alone settles it
    assert not _all_nodata(raw, native_nodata(0.0, "uint8"))
    pixels = np.array([[0, 5, 255], [3, 0, 7]], np.uint16)
    for scaling in (InputScaling(), InputScaling(value_range=(2.0, 9.0)), InputScaling(output_scale=255.0)):
        for nodata in (0.0, 3.0, -1.0):
            expected = scaling.apply(pixels)
            expected[pixels == nodata] = 0.0
            got = scaling.apply(pixels, nodata=native_nodata(nodata, pixels.dtype))
            np.testing.assert_array_equal(got, expected)
