"""ONNX models that hide a tensor with external data somewhere other than graph.initializer.

Each builder writes a model whose hidden tensor names ``location`` as its data file.
The Constant, If and function models are real models onnxruntime runs: their
``leak`` output is the file's bytes (as uint8), which is what a check that reads
only ``graph.initializer`` let through.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

SECRET_BYTES = 16


def _external(name: str, location: str, dtype: int = TensorProto.UINT8) -> TensorProto:
    tensor = TensorProto(name=name, data_type=dtype, dims=[SECRET_BYTES])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(SECRET_BYTES))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _io() -> tuple[list[Any], list[Any]]:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("leak", TensorProto.UINT8, [SECRET_BYTES]),
    ]
    return inputs, outputs


def _save(path: Path, graph: Any, **extra: Any) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **extra)
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def constant_value(path: Path, location: str) -> Path:
    """A ``Constant`` node whose ``value`` tensor reads ``location``."""
    inputs, outputs = _io()
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Constant", [], ["leak"], value=_external("c", location)),
    ]
    return _save(path, helper.make_graph(nodes, "constant", inputs, outputs))


def constant_sparse_value(path: Path, location: str) -> Path:
    """A ``Constant`` node whose ``sparse_value`` keeps its values in ``location``."""
    inputs, outputs = _io()
    indices = helper.make_tensor("i", TensorProto.INT64, [SECRET_BYTES], list(range(SECRET_BYTES)))
    sparse = helper.make_sparse_tensor(_external("s", location), indices, [SECRET_BYTES])
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Constant", [], ["leak"], sparse_value=sparse),
    ]
    return _save(path, helper.make_graph(nodes, "sparse", inputs, outputs))


def tensors_attribute(path: Path, location: str) -> Path:
    """A TENSORS attribute (a list of tensors) on a node, one of them external."""
    inputs, outputs = _io()
    node = helper.make_node("Identity", ["x"], ["y"])
    node.attribute.append(helper.make_attribute("hidden", [_external("t", location)]))
    leak = helper.make_node(
        "Constant", [], ["leak"], value=helper.make_tensor("z", TensorProto.UINT8, [16], [0] * 16)
    )
    return _save(path, helper.make_graph([node, leak], "tensors", inputs, outputs))


def _branch(name: str, location: str | None) -> Any:
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.UINT8, [SECRET_BYTES])
    value = (
        _external(f"{name}_c", location)
        if location
        else helper.make_tensor(f"{name}_c", TensorProto.UINT8, [SECRET_BYTES], [0] * 16)
    )
    node = helper.make_node("Constant", [], [f"{name}_out"], value=value)
    return helper.make_graph([node], name, [], [out])


def if_branch(path: Path, location: str) -> Path:
    """An ``If`` whose then-branch holds the external Constant (the condition is true)."""
    inputs, outputs = _io()
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("b", 9, [], [True])),
        helper.make_node(
            "If",
            ["cond"],
            ["leak"],
            then_branch=_branch("then", location),
            else_branch=_branch("else", None),
        ),
    ]
    return _save(path, helper.make_graph(nodes, "if", inputs, outputs))


def _loop_body(location: str) -> Any:
    body_inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
    ]
    body_outputs = [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("scan_out", TensorProto.UINT8, [SECRET_BYTES]),
    ]
    nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Constant", [], ["scan_out"], value=_external("lc", location)),
    ]
    return helper.make_graph(nodes, "body", body_inputs, body_outputs)


def loop_body(path: Path, location: str) -> Path:
    """A ``Loop`` whose body holds the external Constant."""
    inputs, _ = _io()
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("leak", TensorProto.UINT8, [1, SECRET_BYTES]),
    ]
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n1", 7, [], [1])),
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("g1", 9, [], [True])),
        helper.make_node("Loop", ["n", "go"], ["leak"], body=_loop_body(location)),
    ]
    return _save(path, helper.make_graph(nodes, "loop", inputs, outputs))


def scan_body(path: Path, location: str) -> Path:
    """A ``Scan`` whose body holds an initializer with external data."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])]
    body = helper.make_graph(
        [helper.make_node("Identity", ["xi"], ["yo"])],
        "scan_body",
        [helper.make_tensor_value_info("xi", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("yo", TensorProto.FLOAT, [1])],
        initializer=[_external("body_weight", location)],
    )
    node = helper.make_node("Scan", ["x"], ["y"], num_scan_inputs=1, body=body)
    return _save(path, helper.make_graph([node], "scan", inputs, outputs))


def function_body(path: Path, location: str) -> Path:
    """A model-local function whose body holds the external Constant."""
    inputs, outputs = _io()
    function = helper.make_function(
        "local.hidden",
        "Leak",
        [],
        ["out"],
        [helper.make_node("Constant", [], ["out"], value=_external("fc", location))],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Leak", [], ["leak"], domain="local.hidden"),
    ]
    graph = helper.make_graph(nodes, "function", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.hidden", 1)],
        functions=[function],
    )
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def initializer(path: Path, location: str) -> Path:
    """The plain case: a graph initializer with external data."""
    inputs, outputs = _io()
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Identity", ["w"], ["leak"]),
    ]
    graph = helper.make_graph(
        nodes, "initializer", inputs, outputs, initializer=[_external("w", location)]
    )
    return _save(path, graph)


HIDING_PLACES: dict[str, Callable[[Path, str], Path]] = {
    "initializer": initializer,
    "constant_value": constant_value,
    "constant_sparse_value": constant_sparse_value,
    "tensors_attribute": tensors_attribute,
    "if_branch": if_branch,
    "loop_body": loop_body,
    "scan_body": scan_body,
    "function": function_body,
}
# The ones onnxruntime runs end to end (their ``leak`` output would be the file).
RUNNABLE = ("initializer", "constant_value", "if_branch", "loop_body", "function")


def secret_setup(root: Path) -> tuple[Path, bytes]:
    """A secret file beside (not inside) a model folder; returns the folder and the bytes."""
    secret = bytes(range(100, 100 + SECRET_BYTES))
    (root / "secret.bin").write_bytes(secret)
    folder = root / "model"
    folder.mkdir()
    return folder, secret


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def as_array(secret: bytes) -> np.ndarray:
    return np.frombuffer(secret, dtype=np.uint8)
