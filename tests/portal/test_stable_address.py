"""The stable address from the portal's side: gRPC across a rollout and a rollback under load."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from portal.accounts.services import key_create
from portal.core import engine
from portal.deployments import services
from portal.deployments.models import Deployment
from portal.registry import services as registry_services
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas, free_port, require
from tests.onnx_models import linear_model

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


@pytest.fixture
def versions(personas: Personas, tmp_path: Path) -> list[tuple[ModelVersion, np.ndarray]]:
    require("a managed nginx", engine.proxy() is not None, "apt-get install nginx; make test does")
    model = Model.objects.create(team=personas.acme, name="demo")
    made = []
    for seed in (1, 2):
        path = tmp_path / f"m{seed}.onnx"
        weight, bias = linear_model(path, seed=seed)
        version = registry_services.version_upload(
            model=model,
            file=SimpleUploadedFile(path.name, path.read_bytes()),
            user=personas.bob.user,
        )
        registry_services.version_process(version_id=version.pk)
        version.refresh_from_db()
        assert version.is_ready, version.error
        made.append((version, (X @ weight + bias).reshape(-1)))
    yield made
    runtime = engine.runtime()
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=1)


def test_grpc_at_the_stable_address_drops_no_call_across_rollout_and_rollback(
    personas: Personas, versions: list[tuple[ModelVersion, np.ndarray]]
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    (v1, want1), (v2, want2) = versions
    first = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=first.pk)
    deployment = Deployment.objects.get(pk=first.deployment_id)
    first.refresh_from_db()
    address = deployment.grpc_address
    assert address
    assert address != first.internal_grpc  # the proxy's, not the instance's
    output = v1.signature["outputs"][0]["name"]
    # A private deployment: the clients call with a team key, as tritonclient users do.
    _, key = key_create(team=personas.acme, user=personas.bob.user, name="load")
    auth = {"authorization": f"Bearer {key}"}

    stop = threading.Event()
    seen: dict[str, int] = {"v1": 0, "v2": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        triton = grpcclient.InferenceServerClient(address)
        tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        while not stop.is_set():
            try:
                answer = triton.infer("demo", [tensor], client_timeout=10, headers=auth)
                got = answer.as_numpy(output).reshape(-1)
                pairs = (("v1", want1), ("v2", want2))
                which = next((n for n, w in pairs if np.allclose(got, w, rtol=1e-5)), "")
                outcome = which or f"wrong answer {got}"
            except Exception as exc:  # every failure counts, whatever it is
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                if outcome in seen:
                    seen[outcome] += 1
                else:
                    failures.append(outcome)
            time.sleep(0.01)
        triton.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    second = services.deployment_deploy(version=v2, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=second.pk)
    deployment.refresh_from_db()
    assert deployment.current_revision_id == second.pk
    assert deployment.grpc_address == address
    time.sleep(0.5)
    back = services.deployment_rollback(
        deployment=deployment, to_version=v1, user=personas.alice.user
    )
    services.revision_rollout(revision_id=back.pk)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    deployment.refresh_from_db()
    assert deployment.current_revision_id == back.pk
    assert deployment.grpc_address == address
    assert failures == []
    assert seen["v1"] > 20, seen
    assert seen["v2"] > 20, seen

    # The API and the page show it next to the REST endpoint, and the snippet uses it.
    api = personas.vera.client().get(f"/api/v1/deployments/{deployment.pk}/")
    assert api.status_code == 200
    assert api.json()["grpc_address"] == address
    web = Client()
    assert web.login(username="vera", password="vera-password")
    page = web.get(f"/deployments/{deployment.pk}/").content.decode()
    assert f'data-testid="grpc-address">{address}<' in page
    assert f"grpcclient.InferenceServerClient(&quot;{address}&quot;)" in page


_TLS_PROBE = """
import django, requests
django.setup()
from portal.core import engine
from deployer.runtimes.local import free_port
proxy = engine.proxy()
proxy.ensure_running()
try:
    answer = requests.get(proxy.check_url + "/healthz", verify=CA, timeout=5)
    print(proxy.public_url, proxy.tls, answer.status_code, answer.text.strip())
finally:
    proxy.stop()
"""


def test_tls_settings_come_from_file_secrets_and_the_proxy_serves_https(tmp_path: Path) -> None:
    from tests.conftest import REPO
    from tests.deployer.test_proxy_edge import _self_signed

    require("a managed nginx", engine.proxy() is not None, "apt-get install nginx; make test does")
    cert, key, ca = _self_signed(tmp_path)
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "MODELPORT_DATA_DIR": str(tmp_path / "data"),
        "MODELPORT_SECRET_KEY": "x" * 50,
        "MODELPORT_PROXY": "nginx",
        "MODELPORT_PROXY_LISTEN": f"127.0.0.1:{port}",
        "MODELPORT_PROXY_TLS_CERT_FILE": str(tmp_path / "cert.pem"),
        "MODELPORT_PROXY_TLS_KEY_FILE": str(tmp_path / "key.pem"),
    }
    for name in ("MODELPORT_PROXY_URL", "MODELPORT_PROXY_CHECK_URL", "MODELPORT_PROXY_DIR"):
        env.pop(name, None)
    probe = _TLS_PROBE.replace("CA", repr(str(ca)))
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"https://127.0.0.1:{port}", "True", "200", "ok"]

    half = {**env, "MODELPORT_PROXY_TLS_KEY_FILE": ""}
    half.pop("MODELPORT_PROXY_TLS_KEY_FILE")
    failed = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=REPO, env=half,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "MODELPORT_PROXY_TLS_KEY are set together" in failed.stderr


def test_without_nginx_the_endpoint_never_changes_and_drops_nothing(
    personas: Personas, versions: list[tuple[ModelVersion, np.ndarray]], settings: Any
) -> None:
    """MODELPORT_PROXY=none: deploy, roll out, roll back under REST and gRPC load; the
    endpoint and the gRPC address stay the same and not one request fails."""
    import requests
    import tritonclient.grpc as grpcclient

    settings.MODELPORT_PROXY = "none"
    assert engine.proxy() is None
    (v1, want1), (v2, want2) = versions
    first = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=first.pk)
    deployment = Deployment.objects.get(pk=first.deployment_id)
    first.refresh_from_db()
    endpoint, address = deployment.endpoint_url, deployment.grpc_address
    assert endpoint.startswith("http://")
    assert first.internal_url not in endpoint  # the deployment's address, not the instance's
    assert address != first.internal_grpc
    output = v1.signature["outputs"][0]["name"]
    body = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X[0].tolist()}]
    }
    _, key = key_create(team=personas.acme, user=personas.bob.user, name="load")

    stop = threading.Event()
    seen: dict[str, int] = {"v1": 0, "v2": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def which(got: np.ndarray) -> str:
        pairs = (("v1", want1), ("v2", want2))
        return next((n for n, w in pairs if np.allclose(got, w, rtol=1e-5)), f"wrong {got}")

    def count(outcome: str) -> None:
        with lock:
            if outcome in seen:
                seen[outcome] += 1
            else:
                failures.append(outcome)

    def rest_client() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        while not stop.is_set():
            try:
                response = session.post(f"{endpoint}/infer", json=body, timeout=10)
                if response.status_code == 200:
                    count(which(np.array(response.json()["outputs"][0]["data"])))
                else:
                    count(f"HTTP {response.status_code}: {response.text[:200]}")
            except requests.RequestException as exc:
                count(f"{type(exc).__name__}: {exc}")
            time.sleep(0.01)

    def grpc_client() -> None:
        triton = grpcclient.InferenceServerClient(address)
        tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        while not stop.is_set():
            try:
                got = triton.infer(
                    "demo", [tensor], client_timeout=10, headers={"authorization": f"Bearer {key}"}
                ).as_numpy(output)
                count(which(got.reshape(-1)))
            except Exception as exc:  # every failure counts, whatever it is
                count(f"gRPC {type(exc).__name__}: {exc}")
            time.sleep(0.01)
        triton.close()

    threads = [threading.Thread(target=rest_client, daemon=True) for _ in range(3)]
    threads.append(threading.Thread(target=grpc_client, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    second = services.deployment_deploy(version=v2, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=second.pk)
    deployment.refresh_from_db()
    assert (deployment.current_revision_id, deployment.endpoint_url) == (second.pk, endpoint)
    time.sleep(0.5)
    back = services.deployment_rollback(
        deployment=deployment, to_version=v1, user=personas.alice.user
    )
    services.revision_rollout(revision_id=back.pk)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    deployment.refresh_from_db()
    assert deployment.current_revision_id == back.pk
    assert (deployment.endpoint_url, deployment.grpc_address) == (endpoint, address)
    assert failures == []
    assert seen["v1"] > 20, seen
    assert seen["v2"] > 20, seen
