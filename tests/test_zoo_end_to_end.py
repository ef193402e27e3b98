"""The zoo of real architectures through the REST API on a real worker, deployed and
answering right under concurrent requests with batching on.

Every model is uploaded twice: without a sample (validation generates one whose free
dimensions the model accepts) and with the uploader's sample. Version 1 is deployed,
then version 2 rolls out on the same deployment; each instance warms up on its
version's recorded sample (the instance's log says so), and the portal's known-answer
check passes on it. The whole zoo is served by local processes and again through the
Docker engine (each image carries its version's sample).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from deployer.images import docker_client
from tests.conftest import (
    Personas,
    Worker,
    require_module,
    start_worker,
    wait_for,
)
from tests.conftest import _stop_local_instances as stop_local_instances
from tests.portal.factories import inference_headers
from tests.zoo_models import ZOO, ZooModel, assert_close, build, decoded, reference, v2_request

pytestmark = pytest.mark.e2e

CALLERS = 6
PER_CALLER = 3


def _npz(arrays: dict[str, np.ndarray]) -> io.BytesIO:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    buffer.name = "sample.npz"
    return buffer


def _upload(client: Any, model: ZooModel, *, sample: dict[str, np.ndarray] | None) -> None:
    fields: dict[str, Any] = {"file": model.path.open("rb")}
    if sample is not None:
        fields["sample_input"] = _npz(sample)
    try:
        response = client.post(f"/api/v1/models/{model.name}/versions/", fields, format="multipart")
    finally:
        fields["file"].close()
    assert response.status_code == 202, response.content


def _final_version(client: Any, name: str, number: int) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        body = dict(client.get(f"/api/v1/models/{name}/versions/{number}/").json())
        return body if body["status"] in ("ready", "failed") else None

    return dict(wait_for(final, timeout_s=300, interval_s=0.5, what=f"{name} v{number}"))


def _deploy(client: Any, name: str, number: int) -> int:
    response = client.post(
        f"/api/v1/models/{name}/versions/{number}/deploy",
        {"deployment": "production"},
        format="json",
    )
    assert response.status_code == 202, response.content
    return int(response.json()["deployment"]["id"])


def _running(client: Any, deployment_id: int, version: int, worker: Worker) -> dict[str, Any]:
    def live() -> dict[str, Any] | None:
        body = dict(client.get(f"/api/v1/deployments/{deployment_id}/").json())
        if body["status"] == "failed":
            return body
        ok = body["status"] == "running" and body["current_version"] == version
        return body if ok else None

    body = dict(wait_for(live, timeout_s=300, interval_s=0.5, what="the deployment to run"))
    assert body["status"] == "running", (body["error"], worker.log_text()[-3000:])
    return body


def _hammer(model: ZooModel, endpoint: str) -> None:
    """Concurrent callers with mixed batch sizes and free-dimension sizes; all must be right."""
    headers = inference_headers(endpoint)
    work = [
        [
            model.make_inputs(
                1 + (c + i) % 2, model.sizes[(c + i) % len(model.sizes)], 1000 + 10 * c + i
            )
            for i in range(PER_CALLER)
        ]
        for c in range(CALLERS)
    ]
    barrier = threading.Barrier(CALLERS)
    asked = tuple(n for n in reference(model, work[0][0]) if n not in model.optional_outputs)

    def run(inputs: list[dict[str, np.ndarray]]) -> None:
        barrier.wait()
        with requests.Session() as session:
            for x in inputs:
                body = v2_request(x, asked if model.optional_outputs else ())
                reply = session.post(f"{endpoint}/infer", json=body, headers=headers, timeout=60)
                assert reply.status_code == 200, reply.text[:500]
                got = decoded(reply.json())
                assert set(got) == set(asked)
                assert_close(got, reference(model, x), asked)

    with ThreadPoolExecutor(CALLERS) as pool:
        list(pool.map(run, work))


def _log_text(client: Any, deployment_id: int) -> str:
    return str(client.get(f"/api/v1/deployments/{deployment_id}/logs?tail=400").json()["lines"])


@pytest.fixture
def zoo_worker(
    worker_env: dict[str, str], mlflow_server: str, settings: Any, tmp_path: Path
) -> Iterator[Worker]:
    """A real worker like ``celery_worker``, with four pool processes: sixteen versions'
    pipelines and rollouts wait on MLflow and on instances starting more than on the CPU."""
    env = {**worker_env, "MLFLOW_TRACKING_URI": mlflow_server}
    settings.MLFLOW_TRACKING_URI = mlflow_server
    worker = start_worker(env, tmp_path / "worker.log", concurrency=4)
    try:
        yield worker
    finally:
        worker.stop()
        stop_local_instances(Path(settings.DATA_DIR))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ZooModel]:
    require_module("torch")
    folder = tmp_path_factory.mktemp("zoo")
    return {name: build(name, folder) for name in ZOO}


def test_zoo_through_the_api_on_a_worker(
    zoo: dict[str, ZooModel], personas: Personas, zoo_worker: Worker
) -> None:
    celery_worker = zoo_worker
    client = personas.bob.client()
    for model in zoo.values():
        assert (
            client.post("/api/v1/models/", {"name": model.name}, format="json").status_code == 201
        )
        _upload(client, model, sample=None)
        _upload(client, model, sample=model.sample)

    deployments: dict[str, int] = {}
    for model in zoo.values():
        generated = _final_version(client, model.name, 1)
        assert generated["status"] == "ready", (model.name, generated["error"])
        validation = generated["report"]["validation"]
        assert validation["sample_source"] == "generated"
        assert validation["generated_sample"]["attempts"][-1]["error"] == ""
        deployments[model.name] = _deploy(client, model.name, 1)

    for model in zoo.values():
        deployment = _running(client, deployments[model.name], 1, celery_worker)
        _hammer(model, deployment["endpoint_url"])
        assert '"warmup_input": "sample"' in _log_text(client, deployments[model.name])

    for model in zoo.values():
        uploaded = _final_version(client, model.name, 2)
        assert uploaded["status"] == "ready", (model.name, uploaded["error"])
        validation = uploaded["report"]["validation"]
        assert validation["sample_source"] == "uploaded"
        assert validation["sample_shapes"] == {k: list(v.shape) for k, v in model.sample.items()}
        assert _deploy(client, model.name, 2) == deployments[model.name]

    for model in zoo.values():
        deployment = _running(client, deployments[model.name], 2, celery_worker)
        _hammer(model, deployment["endpoint_url"])
        logs = _log_text(client, deployments[model.name])
        assert '"warmup_input": "sample"' in logs
        assert f'"dynamic_batching": {str(model.batchable).lower()}' in logs


def test_a_sample_that_does_not_fit_fails_the_version_naming_the_input(
    zoo: dict[str, ZooModel], personas: Personas, celery_worker: Worker
) -> None:
    client = personas.bob.client()
    model = zoo["gru"]
    assert client.post("/api/v1/models/", {"name": "gru"}, format="json").status_code == 201
    wrong = dict(model.sample)
    wrong["h0"] = np.zeros((3, 3, 16), dtype=np.float32)  # 3 layers; the GRU has 2
    _upload(client, model, sample=wrong)
    version = _final_version(client, "gru", 1)
    assert version["status"] == "failed"
    assert "Input h0 has size 3 in dimension 0, the model expects 2" in version["error"]


def test_zoo_through_the_docker_engine(
    zoo: dict[str, ZooModel], docker_mode: None, personas: Personas, zoo_worker: Worker
) -> None:
    """Every architecture, each in its own image and container behind nginx: the image
    carries the version's recorded sample, the container warms up on it and answers right
    under concurrent callers."""
    from portal.deployments.models import Revision

    client = personas.alice.client()
    for model in zoo.values():
        assert (
            client.post("/api/v1/models/", {"name": model.name}, format="json").status_code == 201
        )
        _upload(client, model, sample=None)
    deployments: dict[str, int] = {}
    for model in zoo.values():
        version = _final_version(client, model.name, 1)
        assert version["status"] == "ready", (model.name, version["error"])
        deployments[model.name] = _deploy(client, model.name, 1)
    for model in zoo.values():
        deployment = _running(client, deployments[model.name], 1, zoo_worker)
        _hammer(model, deployment["endpoint_url"])
        logs = _log_text(client, deployments[model.name])
        assert '"warmup_input": "sample"' in logs, model.name  # the image's /model/warmup.npz
        assert f'"dynamic_batching": {str(model.batchable).lower()}' in logs, model.name
        revision = Revision.objects.get(deployment_id=deployments[model.name], version__number=1)
        assert revision.runtime == "docker"
        image = docker_client().images.get(revision.version.report["images"]["cpu"])
        assert image.labels["modelport.model"] == model.name
    assert '"batch_axes": {"x": 0, "h0": 1}' in _log_text(client, deployments["gru"])
