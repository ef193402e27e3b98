"""Containers end to end on a real worker: the REST API path, and workers killed mid-way.

A real Celery worker on Redis and PostgreSQL builds the images and starts the
containers (it is the only process that talks to Docker here); nginx serves the
stable URL. The crash tests SIGKILL the worker and its pool during an image build
and during a rollout, then let reconcile and a fresh worker finish the work.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.conf import settings
from django.utils import timezone

from deployer.images import docker_client
from portal.core import engine
from portal.core.models import Event
from portal.deployments import services
from portal.deployments.choices import DeploymentStatus, ReplicaState, RevisionStatus
from portal.deployments.models import Deployment, Replica, Revision
from portal.registry import services as registry_services
from portal.registry.choices import VersionStatus
from portal.registry.models import ModelVersion
from tests.conftest import Personas, Worker, report_entry, start_worker, wait_for
from tests.onnx_models import linear_model
from tests.portal.factories import inference_headers

pytestmark = pytest.mark.e2e
X = [1.0, 2.0, 3.0, 4.0]


def _upload(client: Any, path: Path, model: str = "fraud") -> dict[str, Any]:
    with path.open("rb") as handle:
        response = client.post(
            f"/api/v1/models/{model}/versions/", {"file": handle}, format="multipart"
        )
    assert response.status_code == 202, response.content
    return dict(response.json())


def _version(client: Any, number: int, model: str = "fraud") -> dict[str, Any]:
    return dict(client.get(f"/api/v1/models/{model}/versions/{number}/").json())


def _deployment(client: Any, deployment_id: int) -> dict[str, Any]:
    return dict(client.get(f"/api/v1/deployments/{deployment_id}/").json())


def _infer(endpoint: str) -> np.ndarray:
    response = requests.post(
        f"{endpoint}/infer",
        headers=inference_headers(endpoint),
        json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"])


def _age(queryset: Any) -> None:
    """Make working rows look abandoned: older than the stale limit reconcile uses."""
    stale = timedelta(seconds=settings.MODELPORT_STALE_AFTER_S + 5)
    queryset.update(updated_at=timezone.now() - stale)


@pytest.fixture
def image_repository(
    docker_mode: None, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A private image repository and base image: everything is really built again.

    (The same Dockerfile on the same base would be one cache hit, over in a second.)
    """
    repository = f"mp-crash-{uuid.uuid4().hex[:8]}"
    for name, value in [
        ("MODELPORT_IMAGE_REPOSITORY", repository),
        ("MODELPORT_BASE_IMAGE", f"{repository}/base:test"),
        ("MODELPORT_LOCAL_BASE_IMAGE", f"{repository}/base:test"),
    ]:
        setattr(settings, name, value)
        monkeypatch.setenv(name, value)
    yield repository
    client = docker_client()
    base = f"{repository}/base:test"
    base_id = next((i.id for i in client.images.list() if base in i.tags), "")
    for image in client.images.list():
        for tag in image.tags:
            if tag.startswith(f"{repository}/"):
                with contextlib.suppress(Exception):
                    client.images.remove(tag)
    # The build stages made on that base (untagged) go too.
    for image in client.images.list(filters={"dangling": True}):
        with contextlib.suppress(Exception):
            if base_id and base_id in {entry.get("Id") for entry in image.history()}:
                client.images.remove(image.id)


def test_api_upload_to_inference_through_the_stable_url(
    docker_mode: None, celery_worker: Worker, personas: Personas, tmp_path: Path
) -> None:
    client = personas.alice.client()
    assert client.post("/api/v1/models/", {"name": "fraud"}, format="json").status_code == 201
    path = tmp_path / "m.onnx"
    weight, bias = linear_model(path, seed=int(time.time()))
    version = _upload(client, path)
    seen: list[str] = []

    def ready() -> dict[str, Any] | None:
        body = _version(client, version["number"])
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        return body if body["status"] in ("ready", "failed") else None

    body = wait_for(ready, timeout_s=180, what="the version")
    assert body["status"] == "ready", body
    assert "building" in seen, seen
    row = ModelVersion.objects.get(model__name="fraud", number=version["number"])
    assert row.image_ref
    assert Event.objects.filter(version=row, step="build").exists()

    response = client.post(
        f"/api/v1/models/fraud/versions/{version['number']}/deploy",
        {"deployment": "production"},
        format="json",
    )
    assert response.status_code == 202, response.content
    deployment_id = response.json()["deployment"]["id"]
    deployment = wait_for(
        lambda: (lambda d: d if d["status"] in ("running", "failed") else None)(
            _deployment(client, deployment_id)
        ),
        timeout_s=120,
        what="the deployment",
    )
    assert deployment["status"] == "running", deployment
    assert deployment["endpoint_url"].startswith(f"{settings.MODELPORT_PROXY_URL}/acme/fraud/")
    np.testing.assert_allclose(
        _infer(deployment["endpoint_url"]), np.array(X) @ weight + bias, rtol=1e-5
    )

    revision = Revision.objects.get(deployment_id=deployment_id)
    assert revision.runtime == "docker"
    assert docker_client().containers.get(revision.handle).attrs["HostConfig"]["ReadonlyRootfs"]
    logs = wait_for(
        lambda: (lambda r: r if "ready" in str(r) else None)(
            client.get(f"/api/v1/deployments/{deployment_id}/logs?tail=50").json()
        ),
        timeout_s=30,
        what="the container's log through the API",
    )
    assert logs


def test_worker_killed_mid_build_leaves_one_image_after_reconcile(
    image_repository: str,
    celery_worker: Worker,
    personas: Personas,
    tmp_path: Path,
) -> None:
    client = personas.alice.client()
    assert client.post("/api/v1/models/", {"name": "fraud"}, format="json").status_code == 201
    path = tmp_path / "m.onnx"
    linear_model(path, seed=int(time.time()))
    number = _upload(client, path)["number"]
    version = ModelVersion.objects.get(model__name="fraud", number=number)

    # The runtime image is being built (its base was made first): kill the worker while
    # the engine runs the step that installs the wheels.
    wait_for(
        lambda: Event.objects.filter(
            version=version, step="build", message__startswith="Step 3/"
        ).exists(),
        timeout_s=300,
        interval_s=0.05,
        what="the runtime image build to reach its pip step",
    )
    time.sleep(2)
    celery_worker.kill()
    version.refresh_from_db()
    assert version.status == VersionStatus.BUILDING
    assert version.attempts == 1
    dock = docker_client()
    assert not dock.images.list(name=f"{image_repository}/model")

    _age(ModelVersion.objects.filter(pk=version.pk))
    counts = registry_services.versions_reconcile()
    assert counts == {"requeued": 1, "failed": 0}
    again = start_worker(celery_worker.env, tmp_path / "worker-2.log")
    try:
        wait_for(
            lambda: ModelVersion.objects.filter(
                pk=version.pk, status__in=["ready", "failed"]
            ).exists(),
            timeout_s=300,
            what="the version after the restart",
        )
    finally:
        again.stop()
    version.refresh_from_db()
    assert version.status == VersionStatus.READY, version.error
    assert version.attempts == 2
    ours = [t for i in dock.images.list() for t in i.tags if t.startswith(image_repository)]
    kinds = sorted(tag.split(":")[0] for tag in ours)
    assert kinds == [
        f"{image_repository}/{k}" for k in ("base", "converter", "model", "runtime")
    ], ours
    assert version.image_ref in ours
    # The killed build's step container did not stay behind.
    leftovers = [
        c.id
        for c in dock.containers.list(all=True)
        if "/opt/modelport" in " ".join(c.attrs["Config"].get("Cmd") or [])
    ]
    assert leftovers == []
    report_entry(
        "crash_safety",
        {"scenario": "worker SIGKILL during an image build", "kills": 1, "final": True,
         "status": version.status, "attempts": version.attempts,
         "duplicates": len(ours) - 3 + len(leftovers)},
    )  # fmt: skip


def test_worker_killed_mid_rollout_is_finished_by_reconcile_without_duplicates(
    docker_mode: None, celery_worker: Worker, personas: Personas, tmp_path: Path
) -> None:
    client = personas.alice.client()
    assert client.post("/api/v1/models/", {"name": "fraud"}, format="json").status_code == 201
    answers = []
    for index in range(2):
        path = tmp_path / f"m{index}.onnx"
        weight, bias = linear_model(path, seed=int(time.time()) + index)
        answers.append(np.array(X) @ weight + bias)
        number = _upload(client, path)["number"]
        wait_for(
            lambda n=number: _version(client, n)["status"] == "ready",
            timeout_s=180,
            what="the version",
        )
    first = client.post(
        "/api/v1/models/fraud/versions/1/deploy", {"deployment": "production"}, format="json"
    ).json()
    deployment_id = first["deployment"]["id"]
    wait_for(lambda: _deployment(client, deployment_id)["status"] == "running", timeout_s=120)
    endpoint = _deployment(client, deployment_id)["endpoint_url"]

    second = client.post(
        "/api/v1/models/fraud/versions/2/deploy", {"deployment": "production"}, format="json"
    )
    assert second.status_code == 202, second.content
    revision = Revision.objects.get(deployment_id=deployment_id, version__number=2)
    dock = docker_client()
    # Catch the new container as soon as it exists and freeze it, so the worker is
    # certainly inside the rollout (waiting for readiness) when it is killed.
    container = wait_for(
        lambda: next(
            iter(dock.containers.list(filters={"label": f"modelport.revision={revision.pk}"})),
            None,
        ),
        timeout_s=60,
        interval_s=0.02,
        what="the new container",
    )
    container.pause()
    wait_for(lambda: Revision.objects.get(pk=revision.pk).handle, timeout_s=30)
    celery_worker.kill()
    container.unpause()
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.STARTING
    # Nothing changed for the users: the stable URL still serves version 1.
    np.testing.assert_allclose(_infer(endpoint), answers[0], rtol=1e-5)

    _age(Revision.objects.filter(pk=revision.pk))
    counts = services.deployments_reconcile()
    assert counts["requeued"] == 1
    assert counts["orphans_stopped"] == 0
    again = start_worker(celery_worker.env, tmp_path / "worker-2.log")
    try:
        wait_for(
            lambda: Deployment.objects.filter(
                pk=deployment_id, current_revision=revision, status=DeploymentStatus.RUNNING
            ).exists(),
            timeout_s=120,
            what="the rollout to finish after the restart",
        )
    finally:
        again.stop()
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.LIVE
    assert revision.attempts == 2
    np.testing.assert_allclose(_infer(endpoint), answers[1], rtol=1e-5)
    # One container: the live one (the interrupted attempt's and version 1's are gone).
    owned = engine.runtime().owned()
    assert [i.handle for i in owned] == [revision.handle]
    names = [
        c.name
        for c in dock.containers.list(all=True, filters={"label": "modelport.revision"})
        if c.labels.get("modelport.installation") == settings.MODELPORT_INSTALLATION_ID
    ]
    replica = Replica.objects.get(revision=revision, state=ReplicaState.READY)
    assert names == [f"mp-{settings.MODELPORT_INSTALLATION_ID}-r{revision.pk}-p{replica.pk}"]
    report_entry(
        "crash_safety",
        {"scenario": "worker SIGKILL during a rollout", "kills": 1, "final": True,
         "status": revision.status, "attempts": revision.attempts,
         "duplicates": len(names) - 1},
    )  # fmt: skip
