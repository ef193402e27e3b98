"""ONNX validation in a limited child process: good models pass, bad ones name the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from deployer.errors import DeployerError
from deployer.samples import load_known_answer
from deployer.sandbox import Limits
from deployer.validate import ValidationRequest, validate_onnx
from tests.onnx_models import custom_op_model, external_data_model, greedy_model, linear_model


def test_valid_model_gives_signature_and_known_answer(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    weight, bias = linear_model(model)
    report = validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))
    assert report.signature.to_dict() == {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert report.signature.dynamic_batch
    inputs, outputs = load_known_answer(report.known_answer_path)
    np.testing.assert_allclose(outputs["output"], inputs["input"] @ weight + bias, rtol=1e-5)
    assert report.details["opsets"] == {"ai.onnx": 17}
    assert report.details["parameter_count"] == 15


def test_user_sample_is_used_for_the_known_answer(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    weight, bias = linear_model(model)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"input": [[1, 0, 0, 0]]}))
    report = validate_onnx(
        ValidationRequest(model_path=model, work_dir=tmp_path / "w", sample_path=sample)
    )
    _inputs, outputs = load_known_answer(report.known_answer_path)
    assert report.details["sample_source"] == "uploaded"
    np.testing.assert_allclose(outputs["output"][0], weight[0] + bias, rtol=1e-5)


@pytest.mark.parametrize(
    ("content", "code", "phrase"),
    [
        (b"", "empty_file", "empty"),
        (b"this is a text file, not a model\n" * 4, "not_onnx", "not an ONNX model"),
        (b"\x08\x07", "not_onnx", "holds no ONNX graph"),
    ],
)
def test_malformed_files_fail_with_a_named_cause(
    tmp_path: Path, content: bytes, code: str, phrase: str
) -> None:
    model = tmp_path / "bad.onnx"
    model.write_bytes(content)
    with pytest.raises(DeployerError, match=phrase) as error:
        validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))
    assert error.value.code == code


def test_truncated_model_fails(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    linear_model(good, in_features=64, out_features=64)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DeployerError) as error:
        validate_onnx(ValidationRequest(model_path=truncated, work_dir=tmp_path / "work"))
    assert error.value.code in {"not_onnx", "onnx_check_failed"}


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((4, 3), dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    model = folder / "m.onnx"
    external_data_model(model, "../secret.bin")
    with pytest.raises(DeployerError, match="outside the model's own folder") as error:
        validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))
    assert error.value.code == "external_data_outside"
    external_data_model(model, os.path.abspath(secret))
    with pytest.raises(DeployerError, match="outside the model's own folder"):
        validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))


def test_unsupported_operator_names_onnxruntime(tmp_path: Path) -> None:
    model = tmp_path / "custom.onnx"
    custom_op_model(model)
    with pytest.raises(DeployerError, match=r"onnxruntime .* could not load") as error:
        validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))
    assert error.value.code == "runtime_load_failed"


def test_model_that_allocates_without_bound_hits_the_memory_limit(tmp_path: Path) -> None:
    model = tmp_path / "greedy.onnx"
    greedy_model(model)
    with pytest.raises(DeployerError, match="memory") as error:
        validate_onnx(
            ValidationRequest(
                model_path=model, work_dir=tmp_path / "work", limits=Limits(memory_mb=1024)
            )
        )
    assert error.value.code == "out_of_memory"


def test_wrong_sample_names_the_input(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    linear_model(model)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"input": [[1, 2, 3]]}))
    with pytest.raises(DeployerError, match="Input input has size 3 in dimension 1") as error:
        validate_onnx(
            ValidationRequest(model_path=model, work_dir=tmp_path / "w", sample_path=sample)
        )
    assert error.value.code == "invalid_sample"


def _reflect_pad_model(path: Path, pad: int) -> Path:
    """Reflect padding by ``pad`` over a dynamic length: lengths up to ``pad`` fail."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    pads = np.array([0, 0, pad, 0, 0, pad], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        "reflect",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "padded"])],
        initializer=[numpy_helper.from_array(pads, "pads")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_generated_sample_tries_sizes_until_the_model_runs(tmp_path: Path) -> None:
    from deployer.validate import sample_note

    model = _reflect_pad_model(tmp_path / "pad.onnx", pad=20)  # 16 fails, 32 works
    report = validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "w"))
    generated = report.details["generated_sample"]
    assert (generated["batch"], generated["free_dim_size"]) == (2, 32)
    assert [a["size"] for a in generated["attempts"]] == [16, 32]
    assert "Pad" in generated["attempts"][0]["error"]
    assert report.details["sample_shapes"] == {"x": [2, 2, 32]}
    note = sample_note(report.details)
    assert note == "on a generated sample (x [2, 2, 32]); tried first, and failed: batch 2 x 16"
    _inputs, outputs = load_known_answer(report.known_answer_path)
    assert outputs["y"].shape == (2, 2, 72)


def test_no_generated_size_fits_names_the_sizes_tried(tmp_path: Path) -> None:
    model = _reflect_pad_model(tmp_path / "pad.onnx", pad=2000)
    with pytest.raises(DeployerError) as error:
        validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "w"))
    assert error.value.code == "inference_failed"
    assert "failed on every generated input tried (batch 2 x 16, batch 2 x 32" in str(error.value)
    assert "Upload a sample input" in str(error.value)
