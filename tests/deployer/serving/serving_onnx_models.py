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
