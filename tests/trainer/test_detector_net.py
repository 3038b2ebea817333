"""The demo detector network: output shapes, decoding arithmetic, target encoding, and that it learns."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from services.scenes.synthetic import generate_scene
from services.trainer.detector_data import TrainSettings, training_batches
from services.trainer.detector_net import (
    STRIDE,
    CenterNetDetector,
    HeadMaps,
    decode,
    detection_loss,
    encode_targets,
    parameter_count,
)


def test_forward_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    model = CenterNetDetector(3).eval()
    assert 100_000 < parameter_count(model) < 500_000
    with torch.no_grad():
        boxes, scores, labels = model(torch.rand(2, 3, 192, 128))
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and labels.shape == (2, 100)
    assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 3)).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "top-K comes sorted"
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] <= 128).all()
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 3] <= 192).all()
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    maps = model.heads(torch.rand(1, 3, 192, 128))
    assert maps.heat.shape == (1, 3, 192 // STRIDE, 128 // STRIDE)
    assert maps.regression.shape == (1, 4, 192 // STRIDE, 128 // STRIDE)


def test_decoding_puts_a_peak_where_its_maps_say() -> None:
    heat = torch.full((1, 3, 32, 40), -10.0)
    regression = torch.zeros(1, 4, 32, 40)
    heat[0, 2, 10, 20] = 5.0
    heat[0, 2, 10, 21] = 4.0  # a weaker neighbour: not a peak, must be suppressed
    heat[0, 0, 25, 3] = 2.0
    regression[0, :, 10, 20] = torch.tensor([0.25, 0.5, math.log(5.0), math.log(3.0)])
    regression[0, :, 25, 3] = torch.tensor([0.0, 0.0, math.log(2.0), math.log(2.0)])
    boxes, scores, labels = decode(HeadMaps(heat, regression), 128, 160, 5)
    # Centre (20.25, 10.5) cells * 4 px = (81, 42); size (5, 3) cells = (20, 12) px.
    torch.testing.assert_close(boxes[0, 0], torch.tensor([71.0, 36.0, 91.0, 48.0]))
    assert labels[0, 0] == 2 and math.isclose(float(scores[0, 0]), 1 / (1 + math.exp(-5)), rel_tol=1e-6)
    torch.testing.assert_close(boxes[0, 1], torch.tensor([8.0, 96.0, 16.0, 104.0]))
    assert labels[0, 1] == 0
    assert float(scores[0, 2]) < 1e-4, "the suppressed neighbour and flat background score nothing"


def test_targets_decode_back_to_the_boxes() -> None:
    _, boxes, labels = generate_scene(256, 192, seed=4, density=200)
    targets = encode_targets([boxes], [labels], 3, 192, 256)
    assert targets.heat.shape == (1, 3, 48, 64)
    assert int(targets.heat.eq(1).sum()) == len(boxes) == len(targets.cell_index)
    heat = torch.where(targets.heat.eq(1), 10.0, -10.0)
    regression = torch.zeros(1, 4, 48, 64)
    flat = regression.permute(0, 2, 3, 1).reshape(-1, 4)
    flat[targets.cell_index] = torch.cat([targets.offset, targets.log_size], dim=1)
    regression = flat.reshape(1, 48, 64, 4).permute(0, 3, 1, 2)
    out_boxes, scores, out_labels = decode(HeadMaps(heat, regression), 192, 256, 100)
    found = scores[0] > 0.5
    assert int(found.sum()) == len(boxes)
    got = np.column_stack([out_labels[0][found].numpy(), out_boxes[0][found].numpy()])
    want = np.column_stack([labels, boxes])
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-3)


def test_a_few_steps_on_one_batch_reduce_the_loss() -> None:
    torch.manual_seed(0)
    settings = TrainSettings(batch_size=4, crop=128)
    images, boxes, labels = next(training_batches(settings))
    targets = encode_targets(boxes, labels, 3, 128, 128)
    model = CenterNetDetector(3, width=16)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = detection_loss(model.heads(torch.from_numpy(images)), targets)
        optimiser.zero_grad()
        loss.total.backward()
        optimiser.step()
        losses.append(float(loss.total.detach()))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_training_batches_are_reproducible_and_boxes_fit_the_crop() -> None:
    settings = TrainSettings(batch_size=3, crop=160, seed=5)
    first = next(training_batches(settings))
    again = next(training_batches(settings))
    other = next(training_batches(replace(settings, seed=6)))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    images, boxes, labels = first
    assert images.shape == (3, 3, 160, 160) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    for b, lab in zip(boxes, labels, strict=True):
        assert len(b) == len(lab) > 0
        assert (b >= 0).all() and (b <= 160).all()
