"""Graceful drain on SIGTERM, Prometheus metrics, and the JSON access log."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from serving_onnx_models import mlp, slow_chain


def test_sigterm_drains_in_flight_requests(start_server, tmp_path: Path) -> None:
    path = slow_chain(tmp_path / "slow.onnx")
    # One batch at a time and no merging, so requests queue up behind each other.
    server = start_server(
        path,
        "slow",
        "--max-batch-size",
        "0",
        "--max-inflight-batches",
        "1",
        "--intra-op-threads",
        "1",
        grpc=True,
    )
    x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [256, 16], "datatype": "FP32", "data": x.tolist()}]}
    )
    # Time one request, to know the queue below takes a while to work through.
    started = time.perf_counter()
    status, _, _ = server.request("POST", "/v2/models/slow/infer", body)
    single = time.perf_counter() - started
    assert status == 200

    sent = threading.Event()
    count = 6

    def rest_call(_: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
        conn.request("POST", "/v2/models/slow/infer", body)
        sent.set()
        response = conn.getresponse()
        response.read()
        return response.status

    def grpc_call() -> tuple[int, ...]:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        inp = grpcclient.InferInput("x", [256, 16], "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("slow", [inp], client_timeout=120).as_numpy("y").shape

    with ThreadPoolExecutor(count + 1) as pool:
        rest = [pool.submit(rest_call, i) for i in range(count)]
        grpc_future = pool.submit(grpc_call)
        sent.wait(10)
        time.sleep(0.3)  # let every request reach the server
        queued = server.json("GET", "/v2/models/slow/stats")[1]["model_stats"][0]
        assert queued["inference_stats"]["success"]["count"] < count + 2, "finished too fast"
        drain_started = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        # While draining, new connections are refused (the listener is closed).
        time.sleep(0.2)
        with socket.socket() as probe:
            probe.settimeout(2)
            refused = probe.connect_ex(("127.0.0.1", server.http_port)) != 0
        statuses = [future.result(timeout=120) for future in rest]
        grpc_shape = grpc_future.result(timeout=120)
    exit_code = server.proc.wait(timeout=60)
    drain_time = time.perf_counter() - drain_started

    assert statuses == [200] * count
    assert grpc_shape == (256, 4)
    assert refused
    assert exit_code == 0
    assert drain_time > single  # it really waited for the queued work
    events = [e.get("event") for e in server.events()]
    assert "draining" in events
    stopped = next(e for e in server.events() if e.get("event") == "stopped")
    assert stopped["unanswered"] == 0


def test_metrics_and_access_log(start_server, tmp_path: Path) -> None:
    path, _ = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp", metrics=True)
    good = {"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": [0.1] * 32}]}
    for _ in range(3):
        assert server.json("POST", "/v2/models/mlp/infer", good)[0] == 200
    bad = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0, 1, 2]}]}
    assert server.json("POST", "/v2/models/mlp/infer", bad)[0] == 400

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    labels = '{model="mlp",version="1"}'
    assert samples[f"nv_inference_request_success_total{labels}"] == 3
    assert samples[f"nv_inference_count_total{labels}"] == 6
    assert samples[f"nv_inference_exec_count_total{labels}"] == 3
    assert (
        samples['nv_inference_request_failure_total{model="mlp",reason="REJECTED",version="1"}']
        == 1
    )
    assert samples[f"nv_inference_compute_infer_duration_us_total{labels}"] > 0
    assert samples[f"nv_inference_queue_duration_us_total{labels}"] >= 0
    assert samples[f"modelport_model_ready{labels}"] == 1
    assert samples['modelport_batch_size_bucket{le="2.0",model="mlp",version="1"}'] == 3
    assert samples[f"modelport_request_duration_seconds_count{labels}"] == 3
    assert "nv_inference_pending_request_count" in text

    server.terminate()
    access = [e for e in server.events() if e.get("logger") == "deployer.serving.access"]
    infer_lines = [e for e in access if e["path"] == "/v2/models/mlp/infer"]
    assert [e["status"] for e in infer_lines] == [200, 200, 200, 400]
    assert "shape" in infer_lines[-1]["error"]
    assert all(e["duration_ms"] >= 0 and e["protocol"] == "http" for e in infer_lines)
    assert infer_lines[0]["bytes_in"] == len(json.dumps(good))


def test_access_log_can_be_turned_off(start_server, tmp_path: Path) -> None:
    path, _ = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp", "--no-access-log")
    assert server.json("GET", "/v2/health/live")[0] == 200
    server.terminate()
    assert not [e for e in server.events() if e.get("logger") == "deployer.serving.access"]
