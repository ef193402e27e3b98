"""The whole path on real parts: REST API or CLI → Redis → a Celery worker → PostgreSQL,
a real MLflow server, and a serving process that answers the right numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import Personas, Worker, wait_for
from tests.onnx_models import linear_model
from tests.portal.factories import inference_headers

pytestmark = pytest.mark.e2e


def _infer(endpoint: str, x: list[list[float]]) -> np.ndarray:
    response = requests.post(
        f"{endpoint}/infer",
        headers=inference_headers(endpoint),
        json={"inputs": [{"name": "input", "shape": [len(x), 4], "datatype": "FP32", "data": x}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.array(output["data"]).reshape(output["shape"])


def test_rest_api_upload_to_inference(
    personas: Personas, celery_worker: Worker, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    model_path = tmp_path / "linear.onnx"
    weight, bias = linear_model(model_path, seed=11)
    client = personas.bob.client()
    assert client.post("/api/v1/models/", {"name": "e2e"}, format="json").status_code == 201
    with model_path.open("rb") as handle:
        upload = client.post("/api/v1/models/e2e/versions/", {"file": handle}, format="multipart")
    assert upload.status_code == 202

    def version_final() -> dict[str, Any] | None:
        body = client.get("/api/v1/models/e2e/versions/1/").json()
        return body if body["status"] in ("ready", "failed") else None

    version = wait_for(version_final, timeout_s=120, what="version 1 to finish")
    assert version["status"] == "ready", (version["error"], celery_worker.log_text()[-3000:])
    assert version["mlflow"]["registered_model"] == "acme.e2e"

    deploy = client.post(
        "/api/v1/models/e2e/versions/1/deploy", {"deployment": "production"}, format="json"
    )
    assert deploy.status_code == 202
    deployment_id = deploy.json()["deployment"]["id"]

    def running() -> dict[str, Any] | None:
        body = client.get(f"/api/v1/deployments/{deployment_id}/").json()
        return body if body["status"] in ("running", "failed") else None

    deployment = wait_for(running, timeout_s=120, what="the deployment to run")
    assert deployment["status"] == "running", (
        deployment["error"],
        celery_worker.log_text()[-3000:],
    )
    assert deployment["current_version"] == 1

    x = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
    np.testing.assert_allclose(
        _infer(deployment["endpoint_url"], x),
        np.array(x, dtype=np.float32) @ weight + bias,
        rtol=1e-5,
    )

    mlflow = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    registered = mlflow.get_model_version("acme.e2e", version["mlflow"]["version"])
    assert registered.run_id == version["mlflow"]["run_id"]
    run = mlflow.get_run(registered.run_id)
    assert run.data.params["sha256"] == version["sha256"]
    assert mlflow.get_model_version_by_alias("acme.e2e", "production").version == registered.version
    assert celery_worker.process.poll() is None


def test_cli_push_deploy_rollback(
    personas: Personas, celery_worker: Worker, live_server: Any, tmp_path: Path
) -> None:
    paths = []
    answers = []
    for seed in (21, 22):
        path = tmp_path / f"m{seed}.onnx"
        answers.append(linear_model(path, seed=seed))
        paths.append(path)
    env = {
        **os.environ,
        "MODELPORT_URL": live_server.url,
        "MODELPORT_TOKEN": personas.alice.token,
    }
    cli = [sys.executable, "-m", "deployer.cli", "--timeout", "180"]

    def run(*args: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [*cli, "--json", *args], env=env, capture_output=True, text=True, timeout=300
        )
        try:
            document = json.loads(done.stdout) if done.stdout.strip() else {}
        except ValueError:
            pytest.fail(f"not JSON: {done.stdout!r} {done.stderr!r}")
        return done.returncode, document

    code, pushed = run("push", str(paths[0]), "--model", "cli-model", "--deploy", "production")
    assert code == 0, (pushed, celery_worker.log_text()[-3000:])
    assert pushed["version"]["status"] == "ready"
    endpoint = pushed["deployment"]["endpoint_url"]
    x = [[0.1, 0.2, 0.3, 0.4]]
    w, b = answers[0]
    np.testing.assert_allclose(
        _infer(endpoint, x), np.array(x, dtype=np.float32) @ w + b, rtol=1e-5
    )

    code, second = run("push", str(paths[1]), "--model", "cli-model", "--deploy", "production")
    assert code == 0
    assert second["deployment"]["current_version"] == 2
    w, b = answers[1]
    np.testing.assert_allclose(
        _infer(second["deployment"]["endpoint_url"], x),
        np.array(x, dtype=np.float32) @ w + b,
        rtol=1e-5,
    )

    code, rolled = run("rollback", "--model", "cli-model", "--deployment", "production",
                       "--to-version", "1", "--wait")  # fmt: skip
    assert code == 0
    assert rolled["revision"]["status"] == "live"
    assert rolled["deployment"]["current_version"] == 1
    w, b = answers[0]
    np.testing.assert_allclose(
        _infer(rolled["deployment"]["endpoint_url"], x),
        np.array(x, dtype=np.float32) @ w + b,
        rtol=1e-5,
    )

    code, status = run("status", "--model", "cli-model")
    assert code == 0
    assert [v["status"] for v in status["versions"]] == ["ready", "ready"]

    # The live instance's log: the answer to our request is in it.
    code, logs = run("logs", "--model", "cli-model", "--tail", "50")
    assert code == 0
    assert logs["revision"] == rolled["revision"]["id"]
    assert "/infer" in logs["lines"]

    # Exit codes a pipeline can act on.
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    code, failed = run("push", str(bad), "--model", "cli-model", "--wait")
    assert code == 1
    assert failed["version"]["error_code"] == "not_onnx"
    assert run("status", "--model", "missing-model")[0] == 4
    env["MODELPORT_TOKEN"] = "mp_not-a-token"
    assert run("status")[0] == 3
    env["MODELPORT_TOKEN"] = personas.bob.token
    code, refused = run("rollback", "--model", "cli-model", "--to-version", "2")
    assert code == 3
    assert refused["error"]["code"] == "forbidden"
    assert celery_worker.process.poll() is None, "the worker must survive bad uploads"
