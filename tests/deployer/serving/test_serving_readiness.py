"""Readiness: a GPU deployment never silently runs on CPU."""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort
import pytest
from serving_onnx_models import mlp

GOOD = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this host has CUDA; the test is for hosts without it",
)
def test_gpu_requested_without_cuda_is_never_ready(start_server, tmp_path: Path) -> None:
    server = start_server(mlp(tmp_path / "m.onnx")[0], "m", "--device", "gpu", ready=False)
    # Wait until the model has loaded (metadata answers), then readiness must stay false.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if server.json("GET", "/v2/models/m")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    time.sleep(0.3)
    for path in ("/v2/health/ready", "/v2/models/m/ready"):
        status, doc = server.json("GET", path)
        assert status == 503
        assert doc["ready"] is False
        assert "CUDA" in doc["error"]
    assert server.json("GET", "/v2/health/live")[0] == 200
    status, doc = server.json("POST", "/v2/models/m/infer", GOOD)
    assert status == 503
    assert "CUDA" in doc["error"]
    assert any(e.get("event") == "gpu_unavailable" for e in server.events())
