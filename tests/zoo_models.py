"""A zoo of real architectures, built in the tests with random weights (no downloads).

Each builder writes an ONNX file and returns a ``ZooModel``: its path, a sample input
that fits it, a way to make further inputs of other sizes, and the names of its inputs
and outputs. Answers are checked against onnxruntime run in the test process. Most are
exported from PyTorch (the torch extra), the fp16 and scalar-input models are written
with onnx.helper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Arrays = dict[str, np.ndarray]


@dataclass
class ZooModel:
    """One built model: its file, a sample, and more inputs (rows, size) -> arrays."""

    name: str
    path: Path
    sample: Arrays
    make_inputs: Callable[[int, int, int], Arrays]  # (batch, size, seed)
    sizes: tuple[int, ...]  # free-dimension sizes it accepts, for mixed concurrent requests
    batch_axes: dict[str, int] = field(default_factory=dict)  # expected, per input
    batchable: bool = True
    # Outputs a caller may leave out (asked for by name in requests).
    optional_outputs: tuple[str, ...] = ()


def _export(module: Any, args: tuple[Any, ...], path: Path, **kwargs: Any) -> None:
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, **kwargs)
    onnx.checker.check_model(str(path))


def conv1d_reflect(path: Path) -> ZooModel:
    """1-D conv net with reflect padding over a dynamic length (length 1 cannot be padded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(4, 8, kernel_size=5, padding=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(8, 6, kernel_size=3, padding=1, padding_mode="reflect"),
    )
    _export(
        net,
        (torch.randn(2, 4, 32),),
        path,
        input_names=["signal"],
        output_names=["features"],
        dynamic_axes={"signal": {0: "batch", 2: "length"}, "features": {0: "batch", 2: "length"}},
    )

    def make(batch: int, size: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        return {"signal": rng.standard_normal((batch, 4, size)).astype(np.float32)}

    return ZooModel("conv1d", path, make(2, 24, 0), make, (16, 40), {"signal": 0})


def gru(path: Path) -> ZooModel:
    """GRU with a state input [layers, batch, hidden]: its batch axis is 1."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 16, num_layers=2, batch_first=True)

        def forward(self, x: Any, h0: Any) -> Any:
            return self.rnn(x, h0)

    torch.manual_seed(1)
    _export(
        Net(),
        (torch.randn(2, 5, 8), torch.randn(2, 2, 16)),
        path,
        input_names=["x", "h0"],
        output_names=["y", "hn"],
        dynamic_axes={
            "x": {0: "batch", 1: "seq"},
            "h0": {1: "batch"},
            "y": {0: "batch", 1: "seq"},
            "hn": {1: "batch"},
        },
    )

    def make(batch: int, size: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        return {
            "x": rng.standard_normal((batch, size, 8)).astype(np.float32),
            "h0": rng.standard_normal((2, batch, 16)).astype(np.float32),
        }

    return ZooModel("gru", path, make(3, 7, 0), make, (4, 9), {"x": 0, "h0": 1})


def lstm(path: Path) -> ZooModel:
    """LSTM with two state inputs [layers, batch, hidden] (h0 and c0)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 12, num_layers=2, batch_first=True)

        def forward(self, x: Any, h0: Any, c0: Any) -> Any:
            y, (hn, cn) = self.rnn(x, (h0, c0))
            return y, hn, cn

    torch.manual_seed(2)
    _export(
        Net(),
        (torch.randn(2, 5, 6), torch.randn(2, 2, 12), torch.randn(2, 2, 12)),
        path,
        input_names=["x", "h0", "c0"],
        output_names=["y", "hn", "cn"],
        dynamic_axes={
            "x": {0: "batch", 1: "seq"},
            "h0": {1: "batch"},
            "c0": {1: "batch"},
            "y": {0: "batch", 1: "seq"},
            "hn": {1: "batch"},
            "cn": {1: "batch"},
        },
    )

    def make(batch: int, size: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        return {
            "x": rng.standard_normal((batch, size, 6)).astype(np.float32),
            "h0": rng.standard_normal((2, batch, 12)).astype(np.float32),
            "c0": rng.standard_normal((2, batch, 12)).astype(np.float32),
        }

    return ZooModel("lstm", path, make(2, 6, 0), make, (3, 8), {"x": 0, "h0": 1, "c0": 1})


def detector(path: Path) -> ZooModel:
    """Detector: three strides, a top-down path that concatenates each map with the x2
    upsampled coarser one, and a head that concatenates the flattened maps of all three
    scales; H and W must be multiples of 8 (the concatenations need equal sizes)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
            self.merge2 = nn.Conv2d(16, 8, 1)
            self.merge1 = nn.Conv2d(16, 8, 1)
            self.heads = nn.ModuleList([nn.Conv2d(8, 6, 1) for _ in range(3)])

        def forward(self, image: Any) -> Any:
            f1 = torch.relu(self.c1(image))
            f2 = torch.relu(self.c2(f1))
            f3 = torch.relu(self.c3(f2))
            p2 = self.merge2(torch.cat([f2, self.up(f3)], dim=1))
            p1 = self.merge1(torch.cat([f1, self.up(p2)], dim=1))
            maps = [head(p).flatten(2) for head, p in zip(self.heads, (p1, p2, f3), strict=True)]
            return torch.cat(maps, dim=2)

    torch.manual_seed(3)
    _export(
        Net(),
        (torch.randn(1, 3, 32, 32),),
        path,
        input_names=["image"],
        output_names=["boxes"],
        dynamic_axes={
            "image": {0: "batch", 2: "height", 3: "width"},
            "boxes": {0: "batch", 2: "anchors"},
        },
    )

    def make(batch: int, size: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        return {"image": rng.standard_normal((batch, 3, size, size + 8)).astype(np.float32)}

    return ZooModel("detector", path, make(1, 24, 0), make, (16, 32), {"image": 0})


def transformer(path: Path) -> ZooModel:
    """Transformer encoder layer: int64 token ids and attention mask, dynamic batch and
    sequence, learned positions (up to 128)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(100, 32)
            self.positions = nn.Embedding(128, 32)
            self.qkv = nn.Linear(32, 96)
            self.out = nn.Linear(32, 32)
            self.norm1 = nn.LayerNorm(32)
            self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.norm2 = nn.LayerNorm(32)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            seq = input_ids.shape[1]
            h = self.tokens(input_ids) + self.positions(torch.arange(seq).unsqueeze(0))
            batch = input_ids.shape[0]
            q, k, v = self.qkv(h).view(batch, seq, 3, 4, 8).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / 8**0.5
            blocked = (1 - attention_mask[:, None, None, :].to(scores.dtype)) * -1e4
            attended = torch.softmax(scores + blocked, dim=-1) @ v
            attended = attended.transpose(1, 2).reshape(batch, seq, 32)
            h = self.norm1(h + self.out(attended))
            return self.norm2(h + self.ff(h))

    torch.manual_seed(4)
    ids = torch.randint(0, 100, (2, 10))
    _export(
        Net(),
        (ids, torch.ones_like(ids)),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"},
        },
    )

    def make(batch: int, size: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        mask = np.ones((batch, size), dtype=np.int64)
        mask[:, size - size // 3 :] = 0  # padded tail
        return {
            "input_ids": rng.integers(0, 100, (batch, size)).astype(np.int64),
            "attention_mask": mask,
        }

    return ZooModel(
        "transformer", path, make(2, 12, 0), make, (6, 20), {"input_ids": 0, "attention_mask": 0}
    )


def _save(graph: Any, path: Path, opset: int = 17) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def fp16_mlp(path: Path) -> ZooModel:
    """A half-precision MLP: FP16 in, FP16 weights, FP16 out."""
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((8, 16)) * 0.3).astype(np.float16)
    w2 = (rng.standard_normal((16, 4)) * 0.3).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "fp16_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    _save(graph, path)

    def make(batch: int, size: int, seed: int) -> Arrays:
        return {"x": np.random.default_rng(seed).standard_normal((batch, 8)).astype(np.float16)}

    return ZooModel("fp16", path, make(2, 0, 0), make, (0,), {"x": 0})


def scalar_input(path: Path) -> ZooModel:
    """x [batch, 4] scaled by an int64 scalar ``steps``: a scalar has no batch axis, so the
    model is served unbatched."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["steps"], ["steps_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "steps_f"], ["scaled"]),
            helper.make_node("Tanh", ["scaled"], ["y"]),
        ],
        "scalar_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    _save(graph, path)

    def make(batch: int, size: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        return {
            "x": rng.standard_normal((batch, 4)).astype(np.float32),
            "steps": np.array(seed % 5 + 1, dtype=np.int64),
        }

    return ZooModel("scalar", path, make(2, 0, 3), make, (0,), batchable=False)


def optional_outputs(path: Path) -> ZooModel:
    """A classifier with an extra output callers usually leave out (its features)."""
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((5, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["features"]),
            helper.make_node("MatMul", ["features", "w2"], ["logits_raw"]),
            helper.make_node("Softmax", ["logits_raw"], ["probabilities"], axis=-1),
        ],
        "optional_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8]),
        ],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    _save(graph, path)

    def make(batch: int, size: int, seed: int) -> Arrays:
        return {"x": np.random.default_rng(seed).standard_normal((batch, 5)).astype(np.float32)}

    return ZooModel(
        "optional", path, make(2, 0, 0), make, (0,), {"x": 0}, optional_outputs=("features",)
    )


ZOO: dict[str, Callable[[Path], ZooModel]] = {
    "conv1d": conv1d_reflect,
    "gru": gru,
    "lstm": lstm,
    "detector": detector,
    "transformer": transformer,
    "fp16": fp16_mlp,
    "scalar": scalar_input,
    "optional": optional_outputs,
}


def build(name: str, folder: Path) -> ZooModel:
    """Build one zoo model into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return ZOO[name](folder / f"{name}.onnx")


def reference(model: ZooModel, inputs: Arrays) -> Arrays:
    """The model's outputs from onnxruntime in this process."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def v2_request(inputs: Arrays, outputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A V2 JSON request for these arrays (only ``outputs`` asked for, when given)."""
    datatypes = {"float32": "FP32", "float16": "FP16", "int64": "INT64"}
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatypes[str(array.dtype)],
                "data": array.ravel().tolist(),
            }
            for name, array in inputs.items()
        ]
    }
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def decoded(answer: dict[str, Any]) -> Arrays:
    """A V2 JSON answer's outputs as arrays."""
    return {
        out["name"]: np.array(out["data"], dtype=np.float64).reshape(out["shape"])
        for out in answer["outputs"]
    }


def assert_close(got: Arrays, want: Arrays, names: tuple[str, ...] | None = None) -> None:
    """Every named output (all of ``want`` by default) matches onnxruntime's."""
    for name in names or tuple(want):
        expected = want[name]
        tolerance = 2e-2 if expected.dtype == np.float16 else 1e-4
        assert got[name].shape == expected.shape, (name, got[name].shape, expected.shape)
        np.testing.assert_allclose(
            got[name], expected.astype(np.float64), rtol=tolerance, atol=tolerance, err_msg=name
        )
