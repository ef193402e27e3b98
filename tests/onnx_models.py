"""Small ONNX models built in code for the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(
    path: Path, *, in_features: int = 4, out_features: int = 3, seed: int = 0, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """y = x @ W + b with a dynamic batch axis; returns (W, b) so tests can compute answers."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((in_features, out_features)) * scale).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["output"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight, bias
