"""A GPU deployment asks for a number of GPUs or exactly which: the API and the Deploy
form take it, keep it on the deployment, and the rollout is refused with the placement's
message when the host cannot give it (this machine has no GPU: the inventory is the
operator's MODELPORT_GPU_DEVICES setting, and no instance gets as far as serving)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from portal.deployments import services
from portal.deployments.choices import DeploymentStatus, RevisionStatus
from portal.deployments.models import Deployment, Replica
from portal.registry.models import Model
from tests.conftest import Personas
from tests.portal.factories import ready_version


@pytest.fixture
def gpu_host(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose operator lists three GPUs and whose GPU runtime answers."""
    settings.MODELPORT_GPU_DEVICES = "0,1,2"
    monkeypatch.setattr(services, "gpu_unavailable_reason", lambda: "")
    monkeypatch.setattr(services, "_local_gpu_reason", lambda: "")


def _deploy(personas: Personas, body: dict[str, Any]) -> Any:
    return personas.bob.client().post("/api/v1/models/demo/versions/1/deploy", body, format="json")


def test_bad_gpu_requests_are_refused_naming_the_field(
    personas: Personas, onnx_file: Path, gpu_host: None
) -> None:
    ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file)
    cases = [
        ({"device": "cpu", "gpu_count": 2}, "gpu_count", "applies to device gpu only"),
        ({"device": "gpu", "gpu_ids": "0,0"}, "gpu_ids", "GPU ids are repeated: 0, 0."),
        ({"device": "gpu", "gpu_ids": "0;rm"}, "gpu_ids", "is not a GPU device id"),
        ({"device": "gpu", "gpu_count": 65}, "gpu_count", "less than or equal to 64"),
    ]
    for body, field, message in cases:
        response = _deploy(personas, body)
        assert response.status_code == 400, (body, response.content)
        assert message in str(response.json()["fields"][field]), response.json()
    assert not Deployment.objects.exists()


def test_the_request_is_kept_and_a_rollout_it_cannot_get_is_refused_plainly(
    personas: Personas, onnx_file: Path, gpu_host: None
) -> None:
    ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file)
    response = _deploy(personas, {"device": "gpu", "gpu_count": 4})
    assert response.status_code == 202, response.content
    body = response.json()["deployment"]
    assert (body["gpu_count"], body["gpu_ids"]) == (4, "")
    services.revision_rollout(revision_id=response.json()["revision"]["id"])
    deployment = Deployment.objects.get(pk=body["id"])
    assert deployment.status == DeploymentStatus.FAILED
    assert "4 GPUs asked for, 3 free of 3." in deployment.error
    assert deployment.current_revision is None
    assert deployment.revisions.get().status == RevisionStatus.FAILED

    # Exactly these GPUs: one the host does not have is named, with those it has.
    response = _deploy(personas, {"device": "gpu", "gpu_ids": "1, 7"})
    assert response.status_code == 202, response.content
    assert response.json()["deployment"]["gpu_ids"] == "1,7"
    assert response.json()["deployment"]["gpu_count"] == 2
    services.revision_rollout(revision_id=response.json()["revision"]["id"])
    deployment.refresh_from_db()
    assert "GPU 7 does not exist on this host (it has 0, 1, 2)." in deployment.error
    assert not Replica.objects.exclude(gpus="").exists()  # nothing was given any GPU

    # The Deploy form takes the same request; a CPU deploy ignores the GPU fields.
    page = Client()
    page.force_login(personas.bob.user)
    page.post(
        "/models/demo/versions/1/deploy",
        {"deployment": "form", "device": "gpu", "gpu_count": "", "gpu_ids": "2"},
    )
    form = Deployment.objects.get(name="form")
    assert (form.gpu_count, form.gpu_ids) == (1, "2")
    page.post(
        "/models/demo/versions/1/deploy", {"deployment": "cpu", "device": "cpu", "gpu_ids": "2"}
    )
    cpu = Deployment.objects.get(name="cpu")
    assert (cpu.device, cpu.gpu_ids) == ("cpu", "")
    # The page says what each replica asks for.
    detail = page.get(f"/deployments/{form.pk}/")
    assert detail.status_code == 200
    assert "each on GPU 2" in detail.content.decode()
