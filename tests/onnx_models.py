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


def greedy_model(path: Path, *, elements: int = 20_000_000_000) -> None:
    """A valid model whose output needs ``elements`` floats: it allocates without bound."""
    shape = numpy_helper.from_array(np.array([elements], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["input"], ["s"]),
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["sf"], ["n"], keepdims=0),
            helper.make_node("Add", ["total", "n"], ["output"]),
        ],
        "greedy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def external_data_model(path: Path, location: str) -> None:
    """A linear model whose weight claims to live in the external file ``location``."""
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"])],
        "external",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


def custom_op_model(path: Path) -> None:
    """A model that passes the checker but uses an operator onnxruntime does not have."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["input"], ["output"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))
