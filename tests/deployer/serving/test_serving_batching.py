"""Dynamic batching: concurrent callers each get exactly their own rows back."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving_onnx_models import centered, fixed_batch, mlp, mlp_reference


def _infer_many(port: int, model: str, inputs: list[np.ndarray], name: str) -> list[np.ndarray]:
    """POST each input on one keep-alive connection; returns the decoded outputs."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    outputs = []
    try:
        for x in inputs:
            body = json.dumps(
                {
                    "inputs": [
                        {
                            "name": name,
                            "shape": list(x.shape),
                            "datatype": "FP32",
                            "data": x.tolist(),
                        }
                    ]
                }
            )
            conn.request("POST", f"/v2/models/{model}/infer", body)
            response = conn.getresponse()
            doc = json.loads(response.read())
            assert response.status == 200, doc
            (out,) = doc["outputs"]
            outputs.append(np.array(out["data"], dtype=np.float32).reshape(out["shape"]))
    finally:
        conn.close()
    return outputs


def _stats(server) -> dict:
    return server.json("GET", f"/v2/models/{server.name}/stats")[1]["model_stats"][0]


@pytest.mark.parametrize("delay_us", ["0", "3000"])
def test_concurrent_callers_get_their_own_rows(start_server, tmp_path: Path, delay_us) -> None:
    path, layers = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp", "--max-batch-size", "16", "--max-queue-delay-us", delay_us)
    callers = 48
    per_caller = 12
    rng = np.random.default_rng(7)
    # Distinct inputs per caller and per request, with 1 to 3 rows so batches mix sizes.
    work = [
        [
            rng.standard_normal((1 + (caller + i) % 3, 16)).astype(np.float32) + caller
            for i in range(per_caller)
        ]
        for caller in range(callers)
    ]
    barrier = threading.Barrier(callers)

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        barrier.wait()
        return _infer_many(server.http_port, "mlp", inputs, "input")

    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(run, work))
    for inputs, outputs in zip(work, results, strict=True):
        for x, y in zip(inputs, outputs, strict=True):
            assert y.shape == (x.shape[0], 4)
            np.testing.assert_allclose(y, mlp_reference(layers, x), rtol=1e-4, atol=1e-4)

    stats = _stats(server)
    rows = sum(x.shape[0] for inputs in work for x in inputs)
    assert stats["inference_count"] == rows
    assert stats["inference_stats"]["success"]["count"] == callers * per_caller
    sizes = [entry["batch_size"] for entry in stats["batch_stats"]]
    assert max(sizes) <= 16
    if delay_us != "0":
        # With a queue delay, concurrent requests must have been merged.
        assert stats["execution_count"] < callers * per_caller
        assert max(sizes) > 3


def test_fixed_batch_model_under_concurrency(start_server, tmp_path: Path) -> None:
    server = start_server(fixed_batch(tmp_path / "fixed.onnx"), "fixed")
    status, config = server.json("GET", "/v2/models/fixed/config")
    assert status == 200
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config
    assert config["input"][0]["dims"] == [4, 3]

    callers = 24

    def run(caller: int) -> list[tuple[np.ndarray, np.ndarray]]:
        inputs = [np.full((4, 3), caller * 100 + i, dtype=np.float32) for i in range(8)]
        return list(zip(inputs, _infer_many(server.http_port, "fixed", inputs, "x"), strict=True))

    with ThreadPoolExecutor(callers) as pool:
        for pairs in pool.map(run, range(callers)):
            for x, y in pairs:
                np.testing.assert_allclose(y, x * 3)
    stats = _stats(server)
    assert {entry["batch_size"] for entry in stats["batch_stats"]} == {1}
    assert stats["execution_count"] == callers * 8

    # A request of another shape is refused rather than padded or merged.
    status, doc = server.json(
        "POST",
        "/v2/models/fixed/infer",
        {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [0] * 6}]},
    )
    assert status == 400
    assert "shape" in doc["error"]


def test_model_whose_rows_interact_is_not_batched(start_server, tmp_path: Path) -> None:
    server = start_server(
        centered(tmp_path / "centered.onnx"), "centered", "--max-queue-delay-us", "5000"
    )
    _, config = server.json("GET", "/v2/models/centered/config")
    assert config["max_batch_size"] == 0
    assert any(e.get("event") == "batching_disabled" for e in server.events())

    def run(caller: int) -> None:
        x = np.array([[caller, 2 * caller, 0], [0, 0, 6 * caller]], dtype=np.float32)
        for y in _infer_many(server.http_port, "centered", [x] * 5, "x"):
            np.testing.assert_allclose(y, x - x.mean(axis=0, keepdims=True), atol=1e-5)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, range(16)))
