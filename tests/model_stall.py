"""A model that never returns, for the tests of batch timeouts, Ctrl-C and draining workers: any ONNX model
with an endless Loop in front of its input (importable from every test directory: tests/ is on the path
through tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def endless_loop(model: onnx.ModelProto, input_name: str, *, trips: int = 2**62) -> onnx.ModelProto:
    """``model`` with a Loop of ``trips`` iterations (each adds 1 to a scalar) run before it reads
    ``input_name``: the count, times 0, is added to the input. ONNX Runtime checks a run's terminate flag
    between the loop's iterations, so only a timeout or a stop ends it."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["count_in", "stall_one"], ["count_out"]),
        ],
        "forever",
        [
            helper.make_tensor_value_info("trip", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("count_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("count_out", TensorProto.FLOAT, []),
        ],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "stall_one")],
    )
    stalled = onnx.ModelProto()
    stalled.CopyFrom(model)
    graph = stalled.graph
    rest = list(graph.node)
    for node in rest:  # the model reads the stalled input instead of its own
        node.input[:] = ["stalled_input" if name == input_name else name for name in node.input]
    head = [
        helper.make_node("Loop", ["stall_trips", "stall_always", "stall_zero"], ["stall_count"], body=body),
        helper.make_node("Mul", ["stall_count", "stall_zero"], ["stall_nothing"]),
        helper.make_node("Add", [input_name, "stall_nothing"], ["stalled_input"]),
    ]
    del graph.node[:]
    graph.node.extend([*head, *rest])
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(trips, np.int64), "stall_trips"),
            numpy_helper.from_array(np.array(True), "stall_always"),
            numpy_helper.from_array(np.array(0.0, np.float32), "stall_zero"),
        ]
    )
    onnx.checker.check_model(stalled)
    return stalled
