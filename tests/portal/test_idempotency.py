"""Idempotency-Key on mutating API calls: retries return the first result, exactly once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connections

from portal.core.models import IdempotencyRecord
from portal.deployments.models import Revision
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment


def test_hundred_retries_of_one_upload_make_one_version(
    personas: Personas, onnx_file: Path
) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    client = personas.bob.client()
    content = onnx_file.read_bytes()
    bodies = []
    for _ in range(100):
        response = client.post(
            "/api/v1/models/demo/versions/",
            {"file": SimpleUploadedFile("m.onnx", content)},
            format="multipart",
            HTTP_IDEMPOTENCY_KEY="upload-once",
        )
        assert response.status_code == 202
        bodies.append(response.json())
    assert ModelVersion.objects.count() == 1
    assert all(body["number"] == 1 for body in bodies)
    assert all(body == bodies[0] for body in bodies)


def test_replay_is_marked(personas: Personas) -> None:
    client = personas.bob.client()
    first = client.post("/api/v1/models/", {"name": "m1"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    again = client.post("/api/v1/models/", {"name": "m1"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in first
    assert again["Idempotent-Replayed"] == "true"
    # Without the key the same request is a new one (and here a duplicate name).
    plain = client.post("/api/v1/models/", {"name": "m1"}, format="json")
    assert plain.status_code == 400


def test_same_key_other_request_is_422(personas: Personas, onnx_file: Path) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    client = personas.bob.client()
    client.post(
        "/api/v1/models/demo/versions/",
        {"file": SimpleUploadedFile("m.onnx", onnx_file.read_bytes())},
        format="multipart",
        HTTP_IDEMPOTENCY_KEY="k2",
    )
    other = client.post(
        "/api/v1/models/demo/versions/",
        {"file": SimpleUploadedFile("m.onnx", onnx_file.read_bytes() + b"\0")},
        format="multipart",
        HTTP_IDEMPOTENCY_KEY="k2",
    )
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"
    assert ModelVersion.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_same_key_while_running_is_409(personas: Personas) -> None:
    from portal.core.idempotency import fingerprint

    client = personas.bob.client()
    started = threading.Event()
    release = threading.Event()
    results: dict[str, int] = {}

    from portal.registry import services

    original = services.model_create

    def slow_create(**kwargs: object) -> object:
        started.set()
        release.wait(10)
        return original(**kwargs)  # type: ignore[arg-type]

    services.model_create = slow_create  # type: ignore[assignment]
    try:

        def first_call() -> None:
            response = client.post(
                "/api/v1/models/", {"name": "slow"}, format="json", HTTP_IDEMPOTENCY_KEY="k3"
            )
            results["first"] = response.status_code
            connections.close_all()

        worker = threading.Thread(target=first_call)
        worker.start()
        assert started.wait(10)
        second = personas.bob.client().post(
            "/api/v1/models/", {"name": "slow"}, format="json", HTTP_IDEMPOTENCY_KEY="k3"
        )
        assert second.status_code == 409
        assert second.json()["code"] == "idempotency_in_progress"
        release.set()
        worker.join(10)
    finally:
        services.model_create = original
        release.set()
    assert results["first"] == 201
    assert fingerprint  # imported for the schema; the record is done now
    assert IdempotencyRecord.objects.get(key="k3").state == "done"


def test_failed_call_releases_the_key(personas: Personas, onnx_file: Path) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    version = ready_version(model, 1, onnx_file)
    ModelVersion.objects.filter(pk=version.pk).update(status="validating")
    client = personas.bob.client()
    refused = client.post(
        "/api/v1/models/demo/versions/1/deploy", {}, format="json", HTTP_IDEMPOTENCY_KEY="d"
    )
    assert refused.status_code == 409
    ModelVersion.objects.filter(pk=version.pk).update(status="ready")
    accepted = client.post(
        "/api/v1/models/demo/versions/1/deploy", {}, format="json", HTTP_IDEMPOTENCY_KEY="d"
    )
    assert accepted.status_code == 202


def test_rollback_and_delete_retries_act_once(personas: Personas, onnx_file: Path) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    v1 = ready_version(model, 1, onnx_file)
    v2 = ready_version(model, 2, onnx_file)
    deployment = running_deployment(v2)
    client = personas.alice.client()
    for _ in range(5):
        response = client.post(
            f"/api/v1/deployments/{deployment.pk}/rollback",
            {"version": 1},
            format="json",
            HTTP_IDEMPOTENCY_KEY="rb",
        )
        assert response.status_code == 202
    assert Revision.objects.filter(deployment=deployment, version=v1).count() == 1
    for _ in range(3):
        deleted = client.delete(f"/api/v1/models/{model.name}-x/", HTTP_IDEMPOTENCY_KEY="del")
        assert deleted.status_code == 404  # failures are not kept: each retry is evaluated


def test_keys_belong_to_their_user(personas: Personas) -> None:
    first = personas.bob.client().post(
        "/api/v1/models/", {"name": "mine"}, format="json", HTTP_IDEMPOTENCY_KEY="shared"
    )
    other = personas.alice.client().post(
        "/api/v1/models/", {"name": "theirs"}, format="json", HTTP_IDEMPOTENCY_KEY="shared"
    )
    assert first.status_code == other.status_code == 201
