"""Small ONNX models for the serving tests, built with onnx.helper (no downloads)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp(
    path: Path, *, sizes: tuple[int, ...] = (16, 32, 4), seed: int = 0
) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    """A float MLP (Gemm + Relu) with a dynamic batch axis; returns the weights for checking."""
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    layers = []
    current = "input"
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = rng.standard_normal(fan_out).astype(np.float32) * 0.1
        layers.append((weight, bias))
        inits += [
            numpy_helper.from_array(weight, f"W{index}"),
            numpy_helper.from_array(bias, f"B{index}"),
        ]
        last = index == len(sizes) - 2
        out = "output" if last else f"h{index}"
        gemm_out = out if last else f"g{index}"
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"B{index}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    return _save(graph, path), layers


def mlp_reference(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """What `mlp` computes, in numpy."""
    out = x.astype(np.float32)
    for index, (weight, bias) in enumerate(layers):
        out = out @ weight + bias
        if index < len(layers) - 1:
            out = np.maximum(out, 0)
    return out


def multi_io(path: Path) -> Path:
    """Two inputs (FP32, INT64), three outputs (FP32 sum, FP32 product, BOOL positive)."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "b_float"], ["sum"]),
            helper.make_node("Mul", ["a", "b_float"], ["product"]),
            helper.make_node("Greater", ["sum", "zero"], ["positive"]),
        ],
        "multi_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("product", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("positive", TensorProto.BOOL, ["batch", 4]),
        ],
        initializer=[numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")],
    )
    return _save(graph, path)


LABELS = ["cat", "dog", "émeu"]


def classifier(path: Path) -> Path:
    """Scores FP32 [batch,3] -> BYTES label via ArgMax + LabelEncoder; BYTES text is echoed."""
    graph = helper.make_graph(
        [
            helper.make_node("ArgMax", ["scores"], ["index"], axis=1, keepdims=0),
            helper.make_node(
                "LabelEncoder",
                ["index"],
                ["label"],
                domain="ai.onnx.ml",
                keys_int64s=[0, 1, 2],
                values_strings=LABELS,
                default_string="unknown",
            ),
            helper.make_node("Identity", ["text"], ["echo"]),
        ],
        "classifier",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"]),
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 2)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fixed_batch(path: Path, *, rows: int = 4, cols: int = 3) -> Path:
    """y = 3x with a fixed [rows, cols] input: no dynamic batch axis."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
        initializer=[numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")],
    )
    return _save(graph, path)


# V2 datatype -> (ONNX element type, numpy dtype)
ALL_TYPES: dict[str, tuple[int, type]] = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


def all_types(path: Path) -> Path:
    """One Identity per V2 datatype: in_<T> [batch, 2] -> out_<T>."""
    nodes = []
    inputs = []
    outputs = []
    for name, (elem, _) in ALL_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", 2]))
    return _save(helper.make_graph(nodes, "all_types", inputs, outputs), path)


def sample_of(datatype: str, rows: int = 2, seed: int = 0) -> np.ndarray:
    """Distinct sample values of a V2 datatype, shape [rows, 2]."""
    rng = np.random.default_rng(seed)
    dtype = ALL_TYPES[datatype][1]
    if datatype == "BYTES":
        words = np.array([f"w{seed}-{i}-ü".encode() for i in range(rows * 2)], dtype=object)
        return words.reshape(rows, 2)
    if datatype == "BOOL":
        return rng.integers(0, 2, (rows, 2)).astype(np.bool_)
    if datatype.startswith("FP"):
        return (rng.standard_normal((rows, 2)) * 10).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), (rows, 2)).astype(dtype)


def centered(path: Path, *, cols: int = 3) -> Path:
    """y = x - mean(x, axis=0): a dynamic first axis whose rows are NOT independent."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "mean"], ["y"]),
        ],
        "centered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def slow_chain(path: Path, *, width: int = 2048, depth: int = 48) -> Path:
    """x [batch, 16] -> a deep chain of width x width MatMuls -> y [batch, 4].

    Slow on purpose (about 8.4 MFLOP x depth per row), to keep requests in flight.
    """
    rng = np.random.default_rng(0)
    w_in = (rng.standard_normal((16, width)) / 4).astype(np.float32)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w_out = (rng.standard_normal((width, 4)) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W_in"], ["h0"])]
    for index in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{index}", "W"], [f"h{index + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "W_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w_in, "W_in"),
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(w_out, "W_out"),
        ],
    )
    return _save(graph, path)


def identity(path: Path, *, width: int) -> Path:
    """y = x for FP32 [batch, width]: large tensors both ways."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
    )
    return _save(graph, path)


def reshaping(path: Path) -> Path:
    """x [batch, n] reshaped to [-1, 4]: synthetic warm-up inputs with n=1 do not fit."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshaping",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])],
        initializer=[numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape")],
    )
    return _save(graph, path)
