"""The classifier's input views: a model with the star-stamp view (two channels) is served through the same
path as a one-view model, the views it is fed come from its own metadata, and a model whose input does not
match what its preprocessing makes is refused saying so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fits_models import linear_classifier, metadata, save

from services.errors import UserError
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.verdicts import CLASSIFIED, judge
from services.frames import PreprocessSpec, generate_frame, write_fits

TWO_VIEWS = PreprocessSpec(bin_factor=2, size=32, stretch="asinh", stamps=2)


def test_a_two_view_model_is_fed_the_whole_frame_and_the_stamps(tmp_path: Path) -> None:
    path = save(
        linear_classifier([0.0, 4.0, 0.0], [0.0, 0.0, 0.0], channels=2),
        tmp_path / "two.onnx",
        metadata(spec=TWO_VIEWS),
    )
    classifier = FrameClassifier(path, providers="cpu", threads=1)
    assert classifier.spec == TWO_VIEWS and "2x2 unbinned 16 px stamps" in classifier.describe()
    frame = generate_frame("mirror_wobble", 4, (96, 96))
    prepared = classifier.prepare(frame.data)
    assert prepared.shape == (2, 32, 32) and prepared.dtype == np.float32
    np.testing.assert_array_equal(prepared, TWO_VIEWS.prepare_views(frame.data))
    (verdict,) = judge(classifier, [("f.fits", write_fits(tmp_path / "f.fits", frame).read_bytes())])
    expected_mean = float(prepared.mean())  # the linear model answers from the mean of both views
    assert verdict.status == CLASSIFIED
    probabilities = verdict.probabilities or {}
    assert (
        probabilities["mirror_wobble"]
        > probabilities["good"]
        == pytest.approx(1 / (2 + np.exp(4 * expected_mean)), abs=1e-5)
    )


def test_views_and_input_channels_must_agree(tmp_path: Path) -> None:
    one_view_meta = metadata(spec=PreprocessSpec(bin_factor=2, size=32))
    two_channels = save(
        linear_classifier([0.0] * 3, [0.0] * 3, channels=2), tmp_path / "a.onnx", one_view_meta
    )
    with pytest.raises(
        UserError, match=r"a\.onnx: the classifier's input must be \[N, 1, S, S\] .*1 view per"
    ):
        FrameClassifier(two_channels)
    one_channel = save(linear_classifier([0.0] * 3, [0.0] * 3), tmp_path / "b.onnx", metadata(spec=TWO_VIEWS))
    with pytest.raises(UserError, match=r"must be \[N, 2, S, S\] \(its preprocessing makes 2 views"):
        FrameClassifier(one_channel)
    # A model of the first preprocessing (version 1, one view) is still served as it was.
    old = metadata(spec=PreprocessSpec(bin_factor=2, size=32))
    assert old["tessera.frames.version"] == "tessera.frames.preprocess/1"
    model = FrameClassifier(save(linear_classifier([0.0] * 3, [0.0] * 3), tmp_path / "c.onnx", old))
    assert model.spec.views == 1 and model.prepare(np.ones((64, 64))).shape == (1, 32, 32)
