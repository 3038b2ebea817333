"""Models fed uint8 pixels: the scaling folded into the graph computes what the CPU scaling computed, and a
whole run finds the same objects either way (the shipped demo detector on a generated scene)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from services.inference import native_input
from services.inference.detector import OnnxDetector
from services.inference.native_input import CACHE_ENV, cached_fold, fold_uint8_scaling
from services.model_runner.model_setup import FLOAT_INPUT_ENV
from services.model_runner.pipeline import run_image
from services.model_runner.request import ImageRequest, Outputs
from services.scenes.geotiff import write_scene_geotiff
from services.tiling.scaling import InputScaling

DEMO = Path(__file__).resolve().parents[2] / "services" / "models" / "tessera-demo-detector.onnx"


def identity_model(opset: int = 17) -> bytes:
    """A model whose output is its float input, so the prefix's values can be read back exactly."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize(
    "scaling",
    [
        InputScaling(),  # x / 255
        InputScaling(output_scale=255.0),  # raw values
        InputScaling(value_range=(10.0, 200.0)),  # stretched and clipped
        InputScaling(value_range=(0.0, 100.0), output_scale=255.0),
    ],
    ids=["unit", "raw", "range", "range-raw"],
)
def test_the_folded_prefix_computes_the_cpu_scaling_to_one_ulp(scaling: InputScaling) -> None:
    affine = scaling.uint8_affine(np.uint8, None)
    assert affine is not None
    composed = fold_uint8_scaling(identity_model(), scale=affine[0], zero_point=affine[1], clip_max=affine[2])
    assert composed is not None
    session = ort.InferenceSession(composed, providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert feed.type == "tensor(uint8)"
    values = np.resize(np.arange(256, dtype=np.uint8), (6, 3, 4, 4))  # every uint8 value
    (folded,) = session.run(None, {feed.name: values})
    np.testing.assert_array_max_ulp(folded, scaling.apply(values), maxulp=1)


def test_scalings_that_are_not_affine_on_uint8_are_not_folded() -> None:
    assert InputScaling().uint8_affine(np.uint16, None) is None  # not uint8
    assert InputScaling(value_range=(0.5, 200.0)).uint8_affine(np.uint8, None) is None  # low not a pixel
    assert InputScaling().uint8_affine(np.uint8, 5) is None  # nodata 5 must become 0: a mask
    assert InputScaling().uint8_affine(np.uint8, 0) == (1 / 255, 0, None)  # nodata 0 is 0 already
    assert InputScaling(value_range=(10.0, 200.0)).uint8_affine(np.uint8, 5) is not None  # clipped to 0
    assert InputScaling().uint8_affine(np.uint8, -1.0) is not None  # matches no pixel
    passthrough = InputScaling(passthrough=True)
    assert passthrough.uint8_affine(np.uint8, None) == (1.0, 0, None)


def test_a_model_too_old_for_the_prefix_is_left_as_it_is() -> None:
    assert fold_uint8_scaling(identity_model(opset=9), scale=1 / 255, zero_point=0, clip_max=None) is None
    assert fold_uint8_scaling(identity_model(opset=10), scale=1.0, zero_point=5, clip_max=1.0) is None


def test_the_composed_detector_is_made_once_and_shares_the_stop() -> None:
    detector = OnnxDetector(DEMO, providers="cpu", batch_size=2)
    native = detector.for_uint8(1 / 255, 0, None)
    assert native is not None and native is detector.for_uint8(1 / 255, 0, None)
    assert native.input_dtype is np.uint8 and native.name == detector.name
    assert native.control is detector.control
    composed = fold_uint8_scaling(DEMO.read_bytes(), scale=1 / 255, zero_point=0, clip_max=None)
    assert composed is not None
    onnx.checker.check_model(onnx.load_from_string(composed))
    detector.close()


def test_a_run_finds_the_same_objects_fed_uint8_or_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "scene.tif"
    layout = write_scene_geotiff(image, 1400, 1100, seed=5, block_size=256)
    detector = OnnxDetector(DEMO, providers="cpu", batch_size=4)

    def run(name: str) -> list[dict]:
        out = tmp_path / f"{name}.geojson"
        request = ImageRequest(
            job_id=name,
            image=str(image),
            model=str(DEMO),
            outputs=Outputs(path=str(out)),
            batch_size=4,
            region_size=(768, 768),
        )
        run_image(request, detector=detector)
        return json.loads(out.read_text())["features"]

    native = run("native")
    monkeypatch.setenv(FLOAT_INPUT_ENV, "1")
    floats = run("float")
    detector.close()
    assert len(native) == len(floats) >= 0.9 * len(layout)

    def key(f: dict) -> tuple:
        return (f["properties"]["class"], *f["properties"]["pixel_bbox"])

    for a, b in zip(sorted(native, key=key), sorted(floats, key=key), strict=True):
        assert a["properties"]["class"] == b["properties"]["class"]
        np.testing.assert_allclose(a["properties"]["pixel_bbox"], b["properties"]["pixel_bbox"], atol=0.01)
        assert abs(a["properties"]["score"] - b["properties"]["score"]) < 1e-3


def test_a_composed_model_is_cached_on_disk_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = cached_fold(identity_model(), scale=1 / 255, zero_point=0, clip_max=None)
    assert first is not None and len(list((tmp_path / "cache").glob("*.onnx"))) == 1

    def no_composing(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("composed again although it is cached")

    monkeypatch.setattr(native_input, "fold_uint8_scaling", no_composing)
    assert cached_fold(identity_model(), scale=1 / 255, zero_point=0, clip_max=None) == first
    # Another scaling of the same model is another entry.
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert cached_fold(identity_model(), scale=1.0, zero_point=0, clip_max=None) != first
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 2
