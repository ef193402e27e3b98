"""Django admin: every model registered; rollback and stop actions call the services."""

from __future__ import annotations

from pathlib import Path

from django.contrib import admin
from django.contrib.auth.models import User
from django.test import Client

from portal.deployments.choices import DeploymentStatus, RevisionKind
from portal.deployments.models import Deployment, Revision
from portal.registry.models import Model
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment


def _staff() -> Client:
    User.objects.create_superuser("root", password="root-password")
    client = Client()
    client.login(username="root", password="root-password")
    return client


def test_every_model_is_registered() -> None:
    from django.apps import apps

    ours = [m for m in apps.get_models() if m.__module__.startswith("portal.")]
    assert ours
    missing = [m.__name__ for m in ours if m not in admin.site._registry]
    assert missing == [], missing


def test_admin_lists_render(personas: Personas, onnx_file: Path) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    running_deployment(ready_version(model, 1, onnx_file))
    client = _staff()
    for path in [
        "/admin/deployments/deployment/",
        "/admin/deployments/revision/",
        "/admin/registry/modelversion/",
        "/admin/registry/model/",
        "/admin/core/event/",
        "/admin/accounts/team/",
        "/admin/accounts/apitoken/",
    ]:
        response = client.get(path, {"q": "demo"})
        assert response.status_code == 200, path


def test_rollback_action_asks_for_the_version_then_rolls_back(
    personas: Personas, onnx_file: Path
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    v1 = ready_version(model, 1, onnx_file)
    v2 = ready_version(model, 2, onnx_file)
    deployment = running_deployment(v2)
    client = _staff()
    data = {"action": "rollback_action", "_selected_action": [deployment.pk]}
    form = client.post("/admin/deployments/deployment/", data)
    assert form.status_code == 200
    assert b"Roll back to" in form.content
    assert b"v1 (" in form.content
    assert b"v2 (" not in form.content  # the version already serving is not offered
    done = client.post(
        "/admin/deployments/deployment/", {**data, "confirm": "yes", "version": v1.pk}
    )
    assert done.status_code == 302
    revision = Revision.objects.get(kind=RevisionKind.ROLLBACK)
    assert revision.version == v1
    assert revision.requested_by.username == "root"


def test_stop_action(personas: Personas, onnx_file: Path) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    deployment = running_deployment(ready_version(model, 1, onnx_file))
    client = _staff()
    client.post(
        "/admin/deployments/deployment/",
        {"action": "stop_action", "_selected_action": [deployment.pk]},
    )
    assert Deployment.objects.get(pk=deployment.pk).status == DeploymentStatus.STOPPING


def test_audit_log_is_read_only(personas: Personas) -> None:
    client = _staff()
    assert client.get("/admin/core/event/add/").status_code == 403
