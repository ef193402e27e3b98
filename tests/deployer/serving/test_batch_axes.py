"""Finding each tensor's batch axis from the graph, and the runtime's use of a warm-up sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from deployer.serving.batch_axes import BatchAxes, Dims, find_batch_axes
from tests.deployer.serving.serving_onnx_models import _save


def test_state_input_batches_on_its_named_axis() -> None:
    found = find_batch_axes(
        [
            Dims("x", (-1, -1, 8), ("batch", "seq", "")),
            Dims("h0", (2, -1, 16), ("", "batch", "")),
        ],
        [
            Dims("y", (-1, -1, 16), ("batch", "seq", "")),
            Dims("hn", (2, -1, 16), ("", "batch", "")),
        ],
    )
    assert found == BatchAxes(inputs={"x": 0, "h0": 1}, outputs=(0, 1), symbol="batch")


def test_batch_named_dimension_wins_over_another_shared_one() -> None:
    found = find_batch_axes(
        [
            Dims("ids", (-1, -1), ("sequence", "batch_size")),
            Dims("mask", (-1, -1), ("sequence", "batch_size")),
        ],
        [Dims("out", (-1, -1, 32), ("sequence", "batch_size", ""))],
    )
    assert isinstance(found, BatchAxes)
    assert found.inputs == {"ids": 1, "mask": 1}
    assert found.outputs == (1,)


def test_unnamed_free_first_dimensions_are_the_fallback() -> None:
    found = find_batch_axes([Dims("x", (-1, 4), ())], [Dims("y", (-1, 3), ())])
    assert found == BatchAxes(inputs={"x": 0}, outputs=(0,))


def test_models_without_a_batch_axis_say_why() -> None:
    scalar = find_batch_axes(
        [Dims("x", (-1, 4), ("batch", "")), Dims("steps", (), ())],
        [Dims("y", (-1, 4), ("batch", ""))],
    )
    assert scalar == "input 'steps' is a scalar, so it has no batch axis"
    fixed_output = find_batch_axes(
        [Dims("x", (-1, 4), ("batch", ""))], [Dims("weights", (3, 4), ("", ""))]
    )
    assert fixed_output == "output 'weights' [3, 4] has no recognizable batch axis"
    fixed = find_batch_axes([Dims("x", (1, 4), ())], [Dims("y", (1, 4), ())])
    assert isinstance(fixed, str)
    assert "'x'" in fixed


def _with_constant_output(path: Path) -> Path:
    """y = x * 2 [batch, 4] plus a constant output [3] that does not grow with the batch."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["y"]),
            helper.make_node(
                "Constant",
                [],
                ["thresholds"],
                value=helper.make_tensor("t", TensorProto.FLOAT, [3], [0.1, 0.5, 0.9]),
            ),
        ],
        "constant_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, [3]),
        ],
    )
    return _save(graph, path)


def test_an_output_without_a_batch_axis_leaves_the_model_unbatched(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_server(_with_constant_output(tmp_path / "c.onnx"), "c")
    ready = next(e for e in server.events() if e.get("event") == "ready")
    assert ready["dynamic_batching"] is False
    assert ready["unbatched_reason"] == "output 'thresholds' [3] has no recognizable batch axis"
    disabled = [e for e in server.events() if e.get("event") == "batching_disabled"]
    assert disabled
    assert "thresholds" in disabled[0]["msg"]


def test_a_warm_up_sample_that_does_not_fit_names_the_problem(
    start_server: Any, tmp_path: Path
) -> None:
    model = _with_constant_output(tmp_path / "c.onnx")
    sample = tmp_path / "known.npz"
    np.savez(sample, **{"input:x": np.zeros((2, 5), dtype=np.float32)})
    server = start_server(model, "c", "--warmup-sample", str(sample), ready=False)
    assert server.proc.wait(timeout=60) == 3
    failed = [e for e in server.events() if e.get("event") == "warmup_failed"]
    assert failed, server.lines
    assert (
        "the warm-up sample's 'x' has shape [2, 5], the model expects [-1, 4]" in failed[0]["msg"]
    )
