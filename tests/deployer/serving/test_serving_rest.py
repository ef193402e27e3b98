"""REST JSON inference, health, metadata and the CLI contract, against a real server process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from serving_onnx_models import mlp, mlp_reference


@pytest.fixture(scope="module")
def mlp_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    return mlp(path)


def test_health_metadata_and_json_infer(start_server, mlp_model) -> None:
    path, layers = mlp_model
    server = start_server(path, "iris", "--model-version", "7")

    assert server.json("GET", "/v2/health/live") == (200, {"live": True})
    assert server.json("GET", "/v2/health/ready") == (200, {"ready": True})
    assert server.json("GET", "/v2/models/iris/ready")[0] == 200
    assert server.json("GET", "/v2/models/iris/versions/7/ready")[0] == 200

    status, meta = server.json("GET", "/v2")
    assert status == 200
    assert meta["name"] == "modelport"
    assert "binary_tensor_data" in meta["extensions"]

    status, model = server.json("GET", "/v2/models/iris")
    assert status == 200
    assert model["name"] == "iris"
    assert model["versions"] == ["7"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]

    x = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    status, answer = server.json(
        "POST",
        "/v2/models/iris/infer",
        {"inputs": [{"name": "input", "shape": [3, 16], "datatype": "FP32", "data": x.tolist()}]},
    )
    assert status == 200
    assert answer["model_name"] == "iris"
    assert answer["model_version"] == "7"
    (out,) = answer["outputs"]
    assert out["name"] == "output"
    assert out["datatype"] == "FP32"
    assert out["shape"] == [3, 4]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(3, 4), mlp_reference(layers, x), rtol=1e-4, atol=1e-5
    )

    # Flat data, a version in the path, and a request id that comes back.
    status, answer = server.json(
        "POST",
        "/v2/models/iris/versions/7/infer",
        {
            "id": "abc",
            "inputs": [
                {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": x[0].tolist()}
            ],
        },
    )
    assert status == 200
    assert answer["id"] == "abc"
    np.testing.assert_allclose(
        answer["outputs"][0]["data"], mlp_reference(layers, x[:1])[0], rtol=1e-4, atol=1e-5
    )


def test_startup_log_line_has_bound_ports(start_server, mlp_model) -> None:
    server = start_server(mlp_model[0], "m", grpc=False, metrics=True)
    listening = [e for e in server.events() if e.get("event") == "listening"]
    assert len(listening) == 1
    assert listening[0]["http_port"] == server.http_port
    assert listening[0]["metrics_port"] == server.metrics_port
    assert listening[0]["grpc_port"] == 0


def test_environment_and_config_file(start_server, mlp_model, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_version": "from-file", "max_batch_size": 4}))
    server = start_server(
        mlp_model[0],
        "m",
        "--config",
        str(config),
        env={"MODELPORT_SERVING_MAX_QUEUE_DELAY_US": "250"},
    )
    status, cfg = server.json("GET", "/v2/models/m/config")
    assert status == 200
    assert cfg["max_batch_size"] == 4
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 250
    assert cfg["version_policy"] == {"specific": {"versions": ["from-file"]}}


def test_unknown_model_and_version_are_404(start_server, mlp_model) -> None:
    server = start_server(mlp_model[0], "m")
    body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}]}
    status, answer = server.json("POST", "/v2/models/other/infer", body)
    assert status == 404
    assert "other" in answer["error"]
    status, answer = server.json("POST", "/v2/models/m/versions/9/infer", body)
    assert status == 404
    assert "version" in answer["error"]
    assert server.json("GET", "/v2/models/other/ready")[0] == 404
    assert server.json("GET", "/nothing")[0] == 404
    assert server.json("GET", "/v2/models/m/infer")[0] == 405
    assert server.json("POST", "/v2/models/m/infer", body)[0] == 200
