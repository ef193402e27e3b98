"""Deploy, roll back, fail safely, stop and reconcile, with real serving processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import requests
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from deployer.runtimes.base import InstanceState
from portal.core import engine
from portal.core.models import Event
from portal.deployments import replicas, services
from portal.deployments.choices import (
    DeploymentStatus,
    ReplicaState,
    RevisionKind,
    RevisionStatus,
)
from portal.deployments.models import Deployment, Replica, Revision
from portal.registry import services as registry_services
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas
from tests.onnx_models import linear_model
from tests.portal.factories import inference_headers


@pytest.fixture
def versions(
    personas: Personas, tmp_path: Path
) -> list[tuple[ModelVersion, np.ndarray, np.ndarray]]:
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
        made.append((version, weight, bias))
    yield made
    runtime = engine.runtime()
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=1)


def _infer(url: str, x: list[float]) -> np.ndarray:
    response = requests.post(
        f"{url}/infer",
        headers=inference_headers(url),
        json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"])


def test_deploy_then_rollback(personas: Personas, versions: list) -> None:
    from mlflow import MlflowClient

    (v1, w1, b1), (v2, w2, b2) = versions
    x = [1.0, 2.0, 3.0, 4.0]

    first = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=first.pk)
    deployment = Deployment.objects.get(pk=first.deployment_id)
    assert deployment.status == DeploymentStatus.RUNNING
    np.testing.assert_allclose(_infer(deployment.endpoint_url, x), np.array(x) @ w1 + b1, rtol=1e-5)

    second = services.deployment_deploy(version=v2, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=second.pk)
    deployment.refresh_from_db()
    assert deployment.current_revision_id == second.pk
    np.testing.assert_allclose(_infer(deployment.endpoint_url, x), np.array(x) @ w2 + b2, rtol=1e-5)
    first.refresh_from_db()
    assert first.status == RevisionStatus.SUPERSEDED
    assert first.live_until is not None
    assert engine.runtime().status(first.handle).state == InstanceState.MISSING

    back = services.deployment_rollback(
        deployment=deployment, to_version=v1, user=personas.alice.user
    )
    services.revision_rollout(revision_id=back.pk)
    deployment.refresh_from_db()
    assert deployment.current_revision_id == back.pk
    assert back.kind == RevisionKind.ROLLBACK
    np.testing.assert_allclose(_infer(deployment.endpoint_url, x), np.array(x) @ w1 + b1, rtol=1e-5)

    history = list(
        deployment.revisions.order_by("id").values_list(
            "version__number", "status", "requested_by__username"
        )
    )
    assert history == [
        (1, "superseded", "bob"),
        (2, "superseded", "bob"),
        (1, "live", "alice"),
    ]
    client = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    alias = client.get_model_version_by_alias("acme.demo", "production")
    assert str(alias.version) == v1.mlflow_version
    assert Event.objects.filter(deployment=deployment, step="rollback").exists()


def test_failed_rollout_keeps_the_old_version_serving(personas: Personas, versions: list) -> None:
    (v1, w1, b1), (v2, _, _) = versions
    first = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=first.pk)
    # Corrupt v2's recorded answer: its instance will answer, but not what was recorded.
    inputs = dict(np.load(v2.known_answer_path))
    inputs["output:output"] = inputs["output:output"] + 1.0
    np.savez(v2.known_answer_path, **inputs)

    second = services.deployment_deploy(version=v2, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=second.pk)
    second.refresh_from_db()
    deployment = Deployment.objects.get(pk=first.deployment_id)
    assert second.status == RevisionStatus.FAILED
    assert "differs from the known answer" in second.error
    assert deployment.status == DeploymentStatus.RUNNING
    assert deployment.current_revision_id == first.pk
    assert "Version 1 keeps serving" in deployment.error
    x = [0.5, 0.5, 0.5, 0.5]
    np.testing.assert_allclose(_infer(deployment.endpoint_url, x), np.array(x) @ w1 + b1, rtol=1e-5)
    assert engine.runtime().status(second.handle).state == InstanceState.MISSING


def test_rollout_is_idempotent(personas: Personas, versions: list) -> None:
    (v1, _, _), _ = versions
    revision = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=revision.pk)
    services.revision_rollout(revision_id=revision.pk)
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.LIVE
    assert revision.attempts == 1
    assert len(engine.runtime().owned()) == 1


def test_second_rollout_while_one_is_running_is_refused(personas: Personas, versions: list) -> None:
    from portal.core.api import Conflict

    (v1, _, _), (v2, _, _) = versions
    services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    with pytest.raises(Conflict, match="already rolling out version 1"):
        services.deployment_deploy(version=v2, name="production", user=personas.bob.user)


def test_reconcile_restarts_a_dead_instance_and_stops_orphans(
    personas: Personas, versions: list
) -> None:
    (v1, w1, b1), _ = versions
    revision = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=revision.pk)
    revision.refresh_from_db()
    os.kill(int(revision.handle.split("-")[1]), signal.SIGKILL)

    # The revision stays; its dead replica is replaced in its slot (reconcile finds what
    # the watcher would have told, when no watcher runs).
    counts = services.deployments_reconcile()
    assert counts["restarted"] == 1
    dead = Replica.objects.get(revision=revision)
    assert dead.state == ReplicaState.FAILED
    assert "SIGKILL" in dead.cause
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert deployment.status == DeploymentStatus.DEGRADED
    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 1
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.RUNNING
    assert deployment.current_revision_id == revision.pk
    replacement = Replica.objects.get(revision=revision, state=ReplicaState.READY)
    assert (replacement.slot, replacement.restarts) == (0, 1)
    restart = Revision.objects.get(pk=revision.pk)
    assert restart.handle == replacement.handle
    x = [1.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(_infer(deployment.endpoint_url, x), w1[0] + b1, rtol=1e-5)

    # An instance no row wants (as after a crash between start and save) is stopped.
    from deployer.runtimes.base import LaunchSpec

    assert v1.served_model_path is not None
    orphan = engine.runtime().start(
        LaunchSpec(
            deployment_id=deployment.pk, revision_id=999, model_name="demo",
            model_version="1", model_path=v1.served_model_path,
        )
    )  # fmt: skip
    counts = services.deployments_reconcile()
    assert counts["orphans_stopped"] == 1
    assert counts["restarted"] == 0
    assert engine.runtime().status(orphan.handle).state == InstanceState.MISSING
    restart.refresh_from_db()
    assert engine.runtime().status(restart.handle).state == InstanceState.RUNNING


def test_stop_and_delete(personas: Personas, versions: list) -> None:
    (v1, _, _), _ = versions
    revision = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=revision.pk)
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    services.deployment_stop(deployment=deployment, user=personas.alice.user, delete=False)
    services.deployment_teardown(deployment_id=deployment.pk, delete=False)
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.STOPPED
    assert deployment.endpoint_url == ""
    assert engine.runtime().owned() == []
    services.deployment_teardown(deployment_id=deployment.pk, delete=True)
    assert not Deployment.objects.filter(pk=deployment.pk).exists()
    assert Event.objects.filter(message__contains="stopped and deleted").exists()


def test_try_it_form_returns_the_right_numbers(personas: Personas, versions: list) -> None:
    from django.test import Client

    (v1, w1, b1), _ = versions
    revision = services.deployment_deploy(version=v1, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=revision.pk)
    client = Client()
    client.login(username="bob", password="bob-password")
    page = client.get(f"/deployments/{revision.deployment_id}/")
    assert b"Try it" in page.content
    assert b"tritonclient" in page.content
    answer = client.post(
        f"/deployments/{revision.deployment_id}/try", {"input-input": "[[1, 2, 3, 4]]"}
    )
    expected = np.array([1, 2, 3, 4], dtype=np.float32) @ w1 + b1
    text = answer.content.decode()
    assert "Answered in" in text
    import json
    import re

    shown = json.loads(re.search(r'data-testid="try-output-output">([^<]*)<', text).group(1))
    np.testing.assert_allclose(shown, expected, rtol=1e-5)
    wrong = client.post(f"/deployments/{revision.deployment_id}/try", {"input-input": "[[1, 2]]"})
    assert b"size 2 in dimension 1" in wrong.content
