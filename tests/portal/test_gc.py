"""Deleting versions and models, and storage GC, on the real Docker engine with real rollbacks.

After a version (or a whole model) is deleted and GC has run, no file, no image and
no container of it is left; every version a deployment may roll back to is kept,
and rolling back to each of them still works.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from deployer.images import docker_client, model_image_remove
from portal.core.models import Event
from portal.deployments import services as deploy_services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry import services
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion
from portal.registry.tasks import storage_collect
from tests.conftest import Personas
from tests.onnx_models import linear_model
from tests.portal.factories import inference_headers

X = [1.0, 2.0, 3.0, 4.0]
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]}


def _built_version(model: Model, path: Path, user: Any) -> ModelVersion:
    version = services.version_upload(
        model=model, file=SimpleUploadedFile(path.name, path.read_bytes()), user=user
    )
    services.version_process(version_id=version.pk)
    services.version_build(version_id=version.pk)
    version.refresh_from_db()
    assert version.is_ready, version.error
    assert version.image_ref
    return version


def _go_live(target: Any, user: Any, *, rollback_to: ModelVersion | None = None) -> Deployment:
    """Deploy the version ``target``, or roll the deployment ``target`` back to a version."""
    if rollback_to is None:
        revision = deploy_services.deployment_deploy(version=target, name="production", user=user)
    else:
        revision = deploy_services.deployment_rollback(
            deployment=target, to_version=rollback_to, user=user
        )
    deploy_services.revision_rollout(revision_id=revision.pk)
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert deployment.status == DeploymentStatus.RUNNING, deployment.error
    assert deployment.current_revision_id == revision.pk, deployment.error
    return deployment


def _answer(deployment: Deployment) -> np.ndarray:
    response = requests.post(
        f"{deployment.endpoint_url}/infer",
        json=BODY,
        headers=inference_headers(deployment.endpoint_url),  # a private deployment
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"])


def _has_image(client: Any, ref: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(ref)
    except ImageNotFound:
        return False
    return True


@pytest.fixture
def fast(settings: Any) -> None:
    settings.MODELPORT_DRAIN_S = 1
    settings.MODELPORT_RETENTION_VERSIONS = 2


def test_version_delete_and_gc_leave_nothing_and_rollback_to_every_retained_version_works(
    docker_mode: None, runtime_image: Any, fast: None, personas: Personas, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = docker_client()
    model = Model.objects.create(team=personas.acme, name="demo")
    made = []
    for n in range(3):
        path = tmp_path / f"m{n}.onnx"
        weight, bias = linear_model(path, seed=random.randrange(1 << 30))
        made.append((_built_version(model, path, personas.bob.user), weight, bias))
    (v1, _, _), (v2, w2, b2), (v3, w3, b3) = made
    deployment = _go_live(v1, personas.bob.user)
    deployment = _go_live(v2, personas.bob.user)
    deployment = _go_live(v3, personas.bob.user)
    np.testing.assert_allclose(_answer(deployment), np.array(X) @ w3 + b3, rtol=1e-5)

    api = personas.alice.client()
    # v3 serves, v2 is within the retention window (2): neither may go.
    refused = api.delete("/api/v1/models/demo/versions/3/")
    assert refused.status_code == 409, refused.content
    assert refused.json()["code"] == "version_retained"
    assert "production serves it" in refused.json()["detail"]
    refused = api.delete("/api/v1/models/demo/versions/2/")
    assert refused.status_code == 409
    assert "could roll back to it" in refused.json()["detail"]
    # A member may not delete versions at all.
    assert personas.bob.client().delete("/api/v1/models/demo/versions/1/").status_code == 403

    # The serving image is in use: the engine function refuses to remove it, safely.
    ours = settings.MODELPORT_INSTALLATION_ID
    in_use = model_image_remove(client, v3.image_ref, installation=ours)
    assert not in_use.removed
    assert in_use.reason.startswith("in use by container")
    # And it never touches an image that is not one of our model images.
    refused_runtime = model_image_remove(client, runtime_image.ref, installation=ours)
    assert not refused_runtime.removed
    assert refused_runtime.reason == "not a model image of this installation"
    assert _has_image(client, runtime_image.ref)

    deleted = api.delete("/api/v1/models/demo/versions/1/")
    assert deleted.status_code == 204, deleted.content
    v1.refresh_from_db()
    assert v1.status == VersionStatus.DELETED
    assert v1.purged_at is None
    assert api.get("/api/v1/models/demo/versions/1/").status_code == 404
    assert [v["number"] for v in api.get("/api/v1/models/demo/versions/").json()] == [3, 2]
    assert Event.objects.filter(version=v1, step="delete", actor=personas.alice.user).exists()
    assert v1.storage_dir.exists()
    assert _has_image(client, v1.image_ref)

    result = storage_collect()  # the task body, as the deploy worker runs it
    assert result["versions_purged"] == 1, result
    v1.refresh_from_db()
    assert v1.purged_at is not None
    assert not v1.storage_dir.exists()
    assert not _has_image(client, v1.image_ref)
    assert not any(
        c.labels.get("modelport.revision") in {str(r.pk) for r in v1.revisions.all()}
        for c in client.containers.list(all=True)
    )
    gc_event = Event.objects.get(version=v1, step="gc")
    assert v1.image_ref in gc_event.message
    tags = (
        MlflowClient(settings.MLFLOW_TRACKING_URI)
        .get_model_version(model.mlflow_name, v1.mlflow_version)
        .tags
    )
    assert tags["modelport_deleted"] == "true"
    # Retained versions keep everything.
    for kept in (v2, v3):
        kept.refresh_from_db()
        assert kept.purged_at is None
        assert kept.storage_dir.exists()
        assert _has_image(client, kept.image_ref)
    # A second run finds nothing more to do.
    again = storage_collect()
    assert again["versions_purged"] == 0, again
    assert again["images_removed"] == 0, again

    # Rollback to every retained version works, and the deleted one is refused.
    deployment = _go_live(deployment, personas.alice.user, rollback_to=v2)
    np.testing.assert_allclose(_answer(deployment), np.array(X) @ w2 + b2, rtol=1e-5)
    deployment = _go_live(deployment, personas.alice.user, rollback_to=v3)
    np.testing.assert_allclose(_answer(deployment), np.array(X) @ w3 + b3, rtol=1e-5)
    back_to_deleted = api.post(
        f"/api/v1/deployments/{deployment.pk}/rollback", {"version": 1}, format="json"
    )
    assert back_to_deleted.status_code in (404, 409), back_to_deleted.content


def test_gc_removes_files_images_and_containers_of_a_deleted_model(
    docker_mode: None, fast: None, personas: Personas, tmp_path: Path, settings: Any
) -> None:
    from mlflow import MlflowClient

    client = docker_client()
    model = Model.objects.create(team=personas.acme, name="gone")
    path = tmp_path / "gone.onnx"
    linear_model(path, seed=random.randrange(1 << 30))
    version = _built_version(model, path, personas.bob.user)
    deployment = _go_live(version, personas.bob.user)
    handle = deployment.current_revision.handle  # type: ignore[union-attr]
    # A teardown that lost its worker after the rows said "stopped": the container survived.
    Deployment.objects.filter(pk=deployment.pk).update(
        status=DeploymentStatus.STOPPED, current_revision=None
    )
    mlflow_name, folder, ref = model.mlflow_name, version.storage_dir, version.image_ref
    services.model_delete(model=model, user=personas.alice.user)
    assert client.containers.get(handle).status == "running"
    assert folder.exists()
    assert _has_image(client, ref)

    settings.MODELPORT_STALE_AFTER_S = 0  # the folder's on-commit removal was lost too
    result = storage_collect(deleted_models=[mlflow_name])
    assert result["containers_removed"] == 1, result
    assert result["images_removed"] >= 1, result
    # At least this model's folder (earlier tests' rows are rolled back, their folders
    # are orphans too).
    assert result["folders_removed"] >= 1, result
    assert not folder.exists()
    assert not _has_image(client, ref)
    assert not [
        c
        for c in client.containers.list(all=True)
        if c.labels.get("modelport.deployment") == str(deployment.pk)
        and c.labels.get("modelport.installation") == settings.MODELPORT_INSTALLATION_ID
    ]
    registered = MlflowClient(settings.MLFLOW_TRACKING_URI).get_registered_model(mlflow_name)
    assert registered.tags["modelport_deleted"] == "true"
    assert Event.objects.filter(team=personas.acme, step="gc", message__contains=ref).exists()


# ---------------------------------------------------------------- without the engine


def test_retention_keeps_the_last_n_live_versions_per_deployment(
    personas: Personas, settings: Any, onnx_file: Path
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from portal.deployments.choices import RevisionStatus
    from portal.deployments.models import Revision
    from portal.registry.selectors import retained_versions
    from tests.portal.factories import ready_version, running_deployment

    settings.MODELPORT_RETENTION_VERSIONS = 2
    model = Model.objects.create(team=personas.acme, name="kept")
    v1, v2, v3, v4 = (ready_version(model, n, onnx_file) for n in range(1, 5))
    deployment = running_deployment(v3)
    start = timezone.now() - timedelta(hours=3)
    for hours, version in enumerate((v1, v2)):
        Revision.objects.create(
            deployment=deployment,
            version=version,
            status=RevisionStatus.SUPERSEDED,
            live_from=start + timedelta(hours=hours),
        )
    kept = retained_versions(model=model)
    # v3 serves; v2 is the one before it; v1 went live too long ago; v4 never served.
    assert set(kept) == {v3.pk, v2.pk}
    assert v1.pk not in kept
    assert v4.pk not in kept
    assert kept[v3.pk][0] == "production serves it"
    api = personas.alice.client()
    assert api.delete("/api/v1/models/kept/versions/4/").status_code == 204
    assert api.delete("/api/v1/models/kept/versions/1/").status_code == 204
    refused = api.delete("/api/v1/models/kept/versions/2/")
    assert refused.status_code == 409
    assert refused.json()["code"] == "version_retained"
    # Numbers are never reused: the next upload is v5 although v4 was deleted.
    from django.db.models import Max

    assert model.versions.aggregate(top=Max("number"))["top"] == 4
    assert [v["number"] for v in api.get("/api/v1/models/kept/versions/").json()] == [3, 2]
    listed = {m["name"]: m for m in api.get("/api/v1/models/").json()}
    assert listed["kept"]["version_count"] == 2, listed["kept"]


def test_a_version_still_in_its_pipeline_cannot_be_deleted(
    personas: Personas, onnx_file: Path
) -> None:
    from tests.portal.factories import ready_version

    model = Model.objects.create(team=personas.acme, name="busy")
    version = ready_version(model, 1, onnx_file)
    version.advance(status=VersionStatus.CONVERTING, step="convert", progress=40)
    refused = personas.alice.client().delete("/api/v1/models/busy/versions/1/")
    assert refused.status_code == 409
    assert refused.json()["code"] == "version_in_progress"
    assert "still converting" in refused.json()["detail"]


def test_admin_storage_page_shows_bytes_of_files_and_images_per_team(
    personas: Personas, onnx_file: Path
) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from tests.portal.factories import ready_version

    acme_model = Model.objects.create(team=personas.acme, name="big")
    version = ready_version(acme_model, 1, onnx_file)
    (version.storage_dir / "extra.bin").write_bytes(b"x" * 5000)
    version.image_ref = "modelport/model:abc-cpu-def"
    version.report = {"image": {"image_model_layer_bytes": 12345}}
    version.save()
    twin = ready_version(acme_model, 2, onnx_file)
    twin.image_ref = version.image_ref  # same content, same image: counted once
    twin.report = version.report
    twin.save()
    globex_model = Model.objects.create(team=personas.globex, name="small")
    ready_version(globex_model, 1, onnx_file)

    User.objects.create_superuser("root", password="root-password")
    admin = Client()
    assert admin.login(username="root", password="root-password")
    page = admin.get("/admin/registry/modelversion/storage/")
    assert page.status_code == 200
    text = page.content.decode()
    size = onnx_file.stat().st_size
    assert f'data-team="acme" data-file-bytes="{2 * size + 5000}" data-image-bytes="12345"' in text
    assert f'data-team="globex" data-file-bytes="{size}" data-image-bytes="0"' in text
    assert "Storage per team" in admin.get("/admin/registry/modelversion/").content.decode()
    # Team admins are not staff: the admin page is not theirs.
    alice = Client()
    assert alice.login(username="alice", password="alice-password")
    assert alice.get("/admin/registry/modelversion/storage/").status_code == 302


def test_gc_runs_on_the_deploy_queue_on_a_schedule() -> None:
    """Only the deploy worker talks to the Docker engine, so image removal is queued there,
    despite the pipeline route that covers the rest of portal.registry.tasks."""
    from portal.celery import app

    options = dict(storage_collect._get_exec_options())
    routed = app.amqp.router.route(options, storage_collect.name, (), {}, None)
    assert routed["queue"].name == "deploy"
    entry = settings.CELERY_BEAT_SCHEDULE["storage-gc"]
    assert entry["task"] == storage_collect.name
    assert entry["schedule"] == 3600.0


def test_a_model_that_was_deployed_can_be_deleted_once_stopped(
    personas: Personas, onnx_file: Path
) -> None:
    """Its revisions used to protect its versions, so the delete raised ProtectedError."""
    from tests.portal.factories import ready_version, running_deployment

    model = Model.objects.create(team=personas.acme, name="retired")
    deployment = running_deployment(ready_version(model, 1, onnx_file))
    Deployment.objects.filter(pk=deployment.pk).update(
        status=DeploymentStatus.STOPPED, current_revision=None
    )
    response = personas.alice.client().delete("/api/v1/models/retired/")
    assert response.status_code == 204, response.content
    assert not Model.objects.filter(pk=model.pk).exists()
    assert not Deployment.objects.filter(pk=deployment.pk).exists()
