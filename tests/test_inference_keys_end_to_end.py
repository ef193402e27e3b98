"""Inference keys end to end: a real local deployment, called with tritonclient over HTTP
and gRPC, with and without a key; a revocation is refused within 2 s, with no restart.

NEEDS THE SERVING RUNTIME THAT CHECKS KEYS (``--keys-file``, helper ``runtime``'s
branch). On the keys branch alone the instance does not know ``--keys-file`` and the
rollout fails: run it after both branches are merged:

    python -m pytest tests/test_inference_keys_end_to_end.py -m keys_runtime
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.accounts.services import key_create, key_revoke
from portal.core import engine
from portal.deployments import services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry import services as registry_services
from portal.registry.models import Model
from tests.conftest import Personas
from tests.onnx_models import linear_model

pytestmark = [pytest.mark.e2e, pytest.mark.keys_runtime]
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


@pytest.fixture
def live(personas: Personas, tmp_path: Path, settings: Any) -> Any:
    """A running private deployment: (deployment, http address, grpc address, expected)."""
    # The pipeline runs in this process: validate in the child process, not a container.
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    model = Model.objects.create(team=personas.acme, name="demo")
    path = tmp_path / "m.onnx"
    weight, bias = linear_model(path, seed=3)
    version = registry_services.version_upload(
        model=model, file=SimpleUploadedFile("m.onnx", path.read_bytes()), user=personas.bob.user
    )
    registry_services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.is_ready, version.error
    revision = services.deployment_deploy(
        version=version, name="production", user=personas.bob.user
    )
    services.revision_rollout(revision_id=revision.pk)
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert deployment.status == DeploymentStatus.RUNNING, deployment.error
    revision.refresh_from_db()
    state = json.loads((engine.local_state_dir() / f"{revision.handle}.json").read_text())
    http = revision.internal_url.split("://", 1)[1]
    grpc = f"127.0.0.1:{state['grpc_port']}"
    yield deployment, http, grpc, X @ weight + bias
    runtime = engine.runtime()
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=1)


def _http_infer(address: str, headers: dict[str, str] | None) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(address)
    tensor = httpclient.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer("demo", [tensor], headers=headers).as_numpy("output")


def _grpc_infer(address: str, headers: dict[str, str] | None) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer("demo", [tensor], headers=headers).as_numpy("output")


def test_private_deployment_needs_a_key_on_http_and_grpc(personas: Personas, live: Any) -> None:
    from tritonclient.utils import InferenceServerException

    _deployment, http, grpc, expected = live
    _row, key = key_create(team=personas.acme, user=personas.bob.user, name="e2e")
    # Health stays open.
    assert requests.get(f"http://{http}/v2/health/ready", timeout=5).status_code == 200
    # No key, a wrong key: refused on both protocols.
    raw = requests.post(f"http://{http}/v2/models/demo/infer", json={"inputs": []}, timeout=5)
    assert raw.status_code == 401
    for infer, address in ((_http_infer, http), (_grpc_infer, grpc)):
        with pytest.raises(InferenceServerException):
            infer(address, None)
        with pytest.raises(InferenceServerException):
            infer(address, {"authorization": "Bearer mpk_wrong"})
    # The key, as tritonclient sends it (headers=...).
    np.testing.assert_allclose(
        _http_infer(http, {"Authorization": f"Bearer {key}"}), expected, rtol=1e-5
    )
    np.testing.assert_allclose(
        _grpc_infer(grpc, {"authorization": f"Bearer {key}"}), expected, rtol=1e-5
    )


def test_revoked_key_is_refused_within_two_seconds(personas: Personas, live: Any) -> None:
    _deployment, http, _grpc, _expected = live
    row, key = key_create(team=personas.acme, user=personas.bob.user, name="revoke-me")
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://{http}/v2/models/demo/infer"
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                        "data": X.ravel().tolist()}]}  # fmt: skip
    deadline = time.monotonic() + 2
    while requests.post(url, json=body, headers=headers, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "a new key was not accepted within 2 s"
        time.sleep(0.05)
    key_revoke(key=row, user=personas.alice.user)
    started = time.monotonic()
    while requests.post(url, json=body, headers=headers, timeout=5).status_code != 401:
        assert time.monotonic() - started < 2, "the revoked key still works after 2 s"
        time.sleep(0.05)
    print(f"revocation took effect in {time.monotonic() - started:.2f} s")


def test_public_deployment_needs_no_key_and_rate_limit_answers_429(
    personas: Personas, live: Any
) -> None:
    deployment, http, _grpc, _expected = live
    url = f"http://{http}/v2/models/demo/infer"
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                        "data": X.ravel().tolist()}]}  # fmt: skip
    _row, key = key_create(
        team=personas.acme, user=personas.bob.user, name="slow", rate_per_s=0.5, burst=1
    )
    time.sleep(1.5)  # the instance re-reads its keys file within a second
    headers = {"Authorization": f"Bearer {key}"}
    assert requests.post(url, json=body, headers=headers, timeout=5).status_code == 200
    limited = requests.post(url, json=body, headers=headers, timeout=5)
    assert limited.status_code == 429
    assert float(limited.headers["Retry-After"]) > 0
    services.deployment_public_set(deployment=deployment, public=True, user=personas.alice.user)
    time.sleep(1.5)
    assert requests.post(url, json=body, timeout=5).status_code == 200


def test_a_key_in_use_shows_when_it_was_last_used(personas: Personas, live: Any) -> None:
    """The instance logs the id of the key it let a call in with; reconcile's reader turns
    that into the key's last use (REST and gRPC alike)."""
    from portal.deployments.inference_keys import keys_last_used_record

    _deployment, http, grpc, _expected = live
    rest_key, rest_plain = key_create(team=personas.acme, user=personas.bob.user, name="rest")
    grpc_key, grpc_plain = key_create(team=personas.acme, user=personas.bob.user, name="grpc")
    idle, _ = key_create(team=personas.acme, user=personas.bob.user, name="idle")
    before = time.time()
    _http_infer(http, {"Authorization": f"Bearer {rest_plain}"})
    _grpc_infer(grpc, {"authorization": f"Bearer {grpc_plain}"})
    deadline = time.monotonic() + 10
    while keys_last_used_record() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # the access log is flushed every few ms
    for key in (rest_key, grpc_key, idle):
        key.refresh_from_db()
    assert rest_key.last_used_at is not None
    assert grpc_key.last_used_at is not None
    assert rest_key.last_used_at.timestamp() >= before - 1
    assert idle.last_used_at is None
