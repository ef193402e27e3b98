"""Uploaded ONNX is validated in the conversion container when Docker answers (issue 12.3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.convert.runner import ContainerLimits, ContainerSandbox
from deployer.errors import DeployerError
from deployer.samples import load_known_answer
from deployer.validate import ValidationRequest, validate_onnx
from tests.deployer import hidden_tensors as ht
from tests.onnx_models import linear_model


def _sandbox(client: Any, image: str) -> ContainerSandbox:
    return ContainerSandbox(
        client, image, ContainerLimits(memory_mb=1024), labels={"modelport.validate-test": "1"}
    )


def _left(client: Any) -> list[Any]:
    return client.containers.list(all=True, filters={"label": "modelport.validate-test=1"})


def test_a_valid_model_is_checked_and_run_in_the_container(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    weight, bias = linear_model(model)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"input": [[1, 0, 0, 0]]}))
    report = validate_onnx(
        ValidationRequest(model_path=model, work_dir=tmp_path / "work", sample_path=sample),
        container=lambda: _sandbox(docker_engine, converter_image),
    )
    assert report.sandbox == "container"
    assert report.signature.to_dict()["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
    ]
    assert report.details["sample_source"] == "uploaded"
    _inputs, outputs = load_known_answer(report.known_answer_path)
    np.testing.assert_allclose(outputs["output"][0], weight[0] + bias, rtol=1e-5)
    assert _left(docker_engine) == []


def test_external_data_in_a_subfolder_travels_with_the_model(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    folder, secret = ht.secret_setup(tmp_path)
    (folder / "data").mkdir()
    (folder / "data" / "c.bin").write_bytes(secret)
    model = ht.function_body(folder / "m.onnx", "data/c.bin")
    report = validate_onnx(
        ValidationRequest(model_path=model, work_dir=tmp_path / "work"),
        container=lambda: _sandbox(docker_engine, converter_image),
    )
    _inputs, outputs = load_known_answer(report.known_answer_path)
    assert outputs["leak"].tobytes() == secret
    assert _left(docker_engine) == []


def test_a_bad_model_fails_in_the_container_with_its_named_cause(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"this is a text file, not a model\n" * 4)
    with pytest.raises(DeployerError, match="not an ONNX model") as error:
        validate_onnx(
            ValidationRequest(model_path=model, work_dir=tmp_path / "work"),
            container=lambda: _sandbox(docker_engine, converter_image),
        )
    assert error.value.code == "not_onnx"
    assert _left(docker_engine) == []


def test_outside_external_data_is_refused_before_any_container(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    model = ht.constant_value(folder / "m.onnx", "../secret.bin")
    with pytest.raises(DeployerError) as error:
        validate_onnx(
            ValidationRequest(model_path=model, work_dir=tmp_path / "work"),
            container=lambda: _sandbox(docker_engine, converter_image),
        )
    assert error.value.code == "external_data_outside"
    assert _left(docker_engine) == []
