"""A classifier the trainer exports is served as it is: its classes, threshold and preprocessing come from
its own metadata, and the service prepares a frame exactly as training did."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.cli import main
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.verdicts import judge
from services.frames import generate_frame, read_frame, write_fits
from services.trainer.data.frames import prepared_frame
from services.trainer.tasks.classifier import ClassifierTask, preprocess_spec


def test_the_trainers_export_is_served_with_its_own_contract(tmp_path: Path) -> None:
    params = [
        "input_size=32",
        "width=0.0625",
        "head_width=16",
        "batch_size=6",
        "synthetic_per_class=4",
        "synthetic_side=96",
        "threshold=0.7",
    ]
    status = main(
        [
            "train",
            "classifier",
            "--dataset",
            "synthetic",
            "--out",
            str(tmp_path / "job"),
            "--steps",
            "1",
            *[arg for p in params for arg in ("--param", p)],
        ]
    )
    assert status == 0
    model = tmp_path / "job" / "model.onnx"
    classifier = FrameClassifier(model)
    assert classifier.class_names == ["good", "mirror_wobble", "shutter_fault"]
    assert classifier.good_class == "good" and classifier.threshold == 0.7
    task = ClassifierTask()
    spec = preprocess_spec(task.params({"input_size": 32}))
    assert classifier.spec == spec

    frame = write_fits(tmp_path / "f.fits", generate_frame("shutter_fault", 3, (96, 96)))
    served = classifier.prepare(read_frame(frame).data)
    trained = prepared_frame(frame, spec)
    assert np.array_equal(served, trained)  # one preprocessing, whoever calls it
    [verdict] = judge(classifier, [(str(frame), frame.read_bytes())])
    assert verdict.status == "CLASSIFIED" and verdict.verdict in classifier.class_names
