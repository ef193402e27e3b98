"""The two benchmark models, built with onnx.helper and random weights (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_mlp(path: Path, sizes: tuple[int, ...] = (256, 1024, 1024, 10), seed: int = 0) -> Path:
    """The issue's 256 -> 1024 -> 1024 -> 10 MLP (Gemm + Relu), dynamic batch axis."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    layers = len(sizes) - 1
    for index in range(layers):
        fan_in, fan_out = sizes[index], sizes[index + 1]
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"W{index}"),
            numpy_helper.from_array(bias, f"B{index}"),
        ]
        out = "output" if index == layers - 1 else f"h{index}"
        gemm = out if index == layers - 1 else f"g{index}"
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"B{index}"], [gemm]))
        if index < layers - 1:
            nodes.append(helper.make_node("Relu", [gemm], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    return _save(graph, path)


class _Builder:
    def __init__(self) -> None:
        self.rng = np.random.default_rng(1)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(
        self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True
    ) -> str:
        # A convolution with its batch norm already folded in: weights + bias.
        w = self.name("w")
        b = self.name("b")
        std = np.sqrt(2.0 / (c_in * k * k))
        self.inits.append(
            numpy_helper.from_array(
                (self.rng.standard_normal((c_out, c_in, k, k)) * std).astype(np.float32), w
            )
        )
        self.inits.append(numpy_helper.from_array(np.zeros(c_out, dtype=np.float32), b))
        out = self.name("conv")
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [out],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        if relu:
            act = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [out], [act]))
            return act
        return out

    def bottleneck(self, x: str, c_in: int, width: int, stride: int) -> str:
        c_out = width * 4
        h = self.conv(x, c_in, width, 1)
        h = self.conv(h, width, width, 3, stride)
        h = self.conv(h, width, c_out, 1, relu=False)
        shortcut = (
            x if stride == 1 and c_in == c_out else self.conv(x, c_in, c_out, 1, stride, relu=False)
        )
        total = self.name("add")
        self.nodes.append(helper.make_node("Add", [h, shortcut], [total]))
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [total], [out]))
        return out


def build_resnet50(path: Path, classes: int = 1000) -> Path:
    """A ResNet-50-shaped CNN (bottlenecks 3-4-6-3, ~25M parameters, ~4 GFLOPs per image)."""
    g = _Builder()
    x = g.conv("input", 3, 64, 7, 2)
    pooled = g.name("pool")
    g.nodes.append(
        helper.make_node(
            "MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        )
    )
    x = pooled
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            x = g.bottleneck(x, c_in, width, stride if block == 0 else 1)
            c_in = width * 4
    gap = g.name("gap")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    flat = g.name("flat")
    g.nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    fc_w = (g.rng.standard_normal((c_in, classes)) / np.sqrt(c_in)).astype(np.float32)
    g.inits += [
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(np.zeros(classes, dtype=np.float32), "fc_b"),
    ]
    g.nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"]))
    graph = helper.make_graph(
        g.nodes,
        "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=g.inits,
    )
    return _save(graph, path)
