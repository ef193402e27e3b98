"""API keys (--keys-file) on a real serving process, over REST and gRPC."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from serving_onnx_models import mlp, mlp_reference
from tritonclient.utils import InferenceServerException

GOOD = "mp_live_good_key_0123456789"
OTHER = "mp_live_other_key_9876543210"


def _entry(key_id: str, key: str, **extra: object) -> dict[str, object]:
    return {
        "id": key_id,
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "expires_at": None,
        "rate_per_s": None,
        "burst": None,
        **extra,
    }


def _write(path: Path, keys: list[dict[str, object]], public: bool = False) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "public": public, "keys": keys}))
    os.replace(tmp, path)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)


def _http_infer(server, key: str | None) -> np.ndarray:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    inp = httpclient.InferInput("input", [2, 16], "FP32")
    inp.set_data_from_numpy(_x())
    headers = _bearer(key) if key else None
    return client.infer("mlp", [inp], headers=headers).as_numpy("output")


def _grpc_infer(server, key: str | None) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    inp = grpcclient.InferInput("input", [2, 16], "FP32")
    inp.set_data_from_numpy(_x())
    # grpcio refuses upper-case metadata keys on the client side: "authorization".
    headers = {"authorization": f"Bearer {key}"} if key else None
    return client.infer("mlp", [inp], headers=headers).as_numpy("output")


def _infer_body() -> str:
    x = _x()
    return json.dumps(
        {"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": x.tolist()}]}
    )


def test_keys_are_required_checked_revoked_and_reloaded(start_server, tmp_path: Path) -> None:
    path, layers = mlp(tmp_path / "mlp.onnx")
    keys = tmp_path / "keys.json"
    _write(keys, [_entry("k_good", GOOD), _entry("k_old", OTHER, expires_at=time.time() - 5)])
    server = start_server(path, "mlp", "--keys-file", str(keys), grpc=True)
    expected = mlp_reference(layers, _x())

    # Health stays open; inference and metadata need a key.
    assert server.request("GET", "/v2/health/ready")[0] == 200
    assert server.request("GET", "/v2/models/mlp/ready")[0] == 200
    for method, route, body in (
        ("POST", "/v2/models/mlp/infer", _infer_body()),
        ("GET", "/v2/models/mlp", None),
        ("GET", "/v2/models/mlp/config", None),
    ):
        status, headers, data = server.request(method, route, body)
        assert status == 401, route
        assert headers["www-authenticate"] == "Bearer"
        assert "Authorization" in json.loads(data)["error"]
    status, _, data = server.request(
        "POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer("wrong")
    )
    assert (status, json.loads(data)["error"]) == (401, "unknown key")
    status, _, data = server.request(
        "POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer(OTHER)
    )
    assert status == 401
    assert "expired" in json.loads(data)["error"]

    # tritonclient with headers, both protocols.
    np.testing.assert_allclose(_http_infer(server, GOOD), expected, rtol=1e-5)
    np.testing.assert_allclose(_grpc_infer(server, GOOD), expected, rtol=1e-5)
    with pytest.raises(InferenceServerException) as caught:
        _grpc_infer(server, None)
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as caught:
        _grpc_infer(server, OTHER)
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    grpc_client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    assert grpc_client.is_server_ready()  # health open over gRPC too
    assert (
        grpc_client.get_model_metadata("mlp", headers={"authorization": f"Bearer {GOOD}"}).name
        == "mlp"
    )

    # A malformed new file is ignored: the last good version stays.
    keys.write_text("{not json")
    time.sleep(1.5)
    np.testing.assert_allclose(_http_infer(server, GOOD), expected, rtol=1e-5)
    assert any(e.get("event") == "keys_file_invalid" for e in server.events())

    # Revocation: k_good removed, k_other added; effective within ~2 s, no restart.
    _write(keys, [_entry("k_other", OTHER)])
    deadline = time.monotonic() + 3.0
    revoked_after = None
    started = time.monotonic()
    while time.monotonic() < deadline:
        status, _, _ = server.request(
            "POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer(GOOD)
        )
        if status == 401:
            revoked_after = time.monotonic() - started
            break
        time.sleep(0.1)
    assert revoked_after is not None
    assert revoked_after < 2.5
    np.testing.assert_allclose(_grpc_infer(server, OTHER), expected, rtol=1e-5)

    # "public": true opens everything.
    _write(keys, [], public=True)
    time.sleep(1.5)
    np.testing.assert_allclose(_http_infer(server, None), expected, rtol=1e-5)


def test_rate_limit_answers_429_with_retry_after(start_server, tmp_path: Path) -> None:
    path, _ = mlp(tmp_path / "mlp.onnx")
    keys = tmp_path / "keys.json"
    _write(keys, [_entry("k_slow", GOOD, rate_per_s=0.5, burst=3)])
    server = start_server(path, "mlp", "--keys-file", str(keys), grpc=True)
    statuses = []
    for _ in range(5):
        status, headers, _ = server.request(
            "POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer(GOOD)
        )
        statuses.append(status)
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    assert int(headers["retry-after"]) >= 1
    with pytest.raises(InferenceServerException) as caught:
        _grpc_infer(server, GOOD)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_missing_keys_file_fails_closed(start_server, tmp_path: Path) -> None:
    path, _ = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp", "--keys-file", str(tmp_path / "absent.json"))
    assert server.request("GET", "/v2/health/live")[0] == 200
    status, _headers, data = server.request(
        "POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer(GOOD)
    )
    assert status == 401
    assert "keys file" in json.loads(data)["error"]


def test_a_key_just_added_works_on_the_next_request(start_server, tmp_path: Path) -> None:
    """An unknown key makes the runtime look at the file again (at most every 50 ms), so a
    key created a moment ago is not refused for the rest of the reload period."""
    path, _ = mlp(tmp_path / "mlp.onnx")
    keys = tmp_path / "keys.json"
    _write(keys, [_entry("k_old", GOOD)])
    server = start_server(path, "mlp", "--keys-file", str(keys))
    assert (
        server.request("POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer(GOOD))[0]
        == 200
    )
    fresh = "mpk_" + "f" * 40
    _write(keys, [_entry("k_old", GOOD), _entry("k_new", fresh)])
    time.sleep(0.06)  # past the unknown-key recheck interval, well inside the 1 s period
    status, _headers, data = server.request(
        "POST", "/v2/models/mlp/infer", _infer_body(), headers=_bearer(fresh)
    )
    assert status == 200, data


def test_a_deployment_made_public_is_open_on_the_next_request(start_server, tmp_path: Path) -> None:
    path, _ = mlp(tmp_path / "mlp.onnx")
    keys = tmp_path / "keys.json"
    _write(keys, [_entry("k_old", GOOD)])
    server = start_server(path, "mlp", "--keys-file", str(keys))
    assert server.request("POST", "/v2/models/mlp/infer", _infer_body())[0] == 401
    _write(keys, [_entry("k_old", GOOD)], public=True)
    time.sleep(0.06)
    assert server.request("POST", "/v2/models/mlp/infer", _infer_body())[0] == 200
