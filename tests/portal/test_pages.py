"""The server-rendered pages: sign-in, models, upload, live version status, deploy, deployment."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment


def _signed_in(username: str) -> Client:
    client = Client()
    assert client.login(username=username, password=f"{username}-password")
    return client


def test_sign_in_page_and_redirect(personas: Personas) -> None:
    anonymous = Client()
    response = anonymous.get("/")
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]
    page = anonymous.get("/accounts/login/")
    assert b"Sign in to ModelPort" in page.content
    signed = anonymous.post(
        "/accounts/login/", {"username": "bob", "password": "bob-password"}, follow=True
    )
    assert b"Models" in signed.content
    assert b"Acme" in signed.content


def test_model_list_create_and_search(personas: Personas) -> None:
    client = _signed_in("bob")
    empty = client.get("/")
    assert b"No models yet" in empty.content
    created = client.post("/", {"name": "churn", "description": "who leaves"})
    assert created.status_code == 302
    assert created["Location"] == "/models/churn/"
    listing = client.get("/", {"q": "chu"}, HTTP_HX_REQUEST="true")
    assert b"churn" in listing.content
    assert b"<html" not in listing.content
    assert b"No model matches" in client.get("/", {"q": "zzz"}).content


def test_viewer_sees_no_create_or_upload_controls(personas: Personas) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    client = _signed_in("vera")
    assert b"New model" not in client.get("/").content
    assert b"Upload a version" not in client.get("/models/demo/").content
    assert client.post("/", {"name": "sneaky"}).status_code == 403
    assert not Model.objects.filter(name="sneaky").exists()


def test_outsider_gets_404_on_pages(personas: Personas) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    version = ready_version(model, 1)
    deployment = running_deployment(version)
    client = _signed_in("charlie")
    for path in ["/models/demo/", "/models/demo/versions/1/", f"/deployments/{deployment.pk}/"]:
        assert client.get(path).status_code == 404, path


def test_upload_form_stores_a_version_and_shows_it_live(
    personas: Personas, onnx_file: Path
) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    client = _signed_in("bob")
    form = client.get("/models/demo/upload/")
    assert b"Drop a model file here" in form.content
    with onnx_file.open("rb") as handle:
        response = client.post(
            "/models/demo/upload/", {"file": handle}, HTTP_X_REQUESTED_WITH="XMLHttpRequest"
        )
    assert response.status_code == 201
    assert response.json()["redirect"] == "/models/demo/versions/1/"
    version = ModelVersion.objects.get()
    assert version.status == VersionStatus.UPLOADED

    # While not final, the status fragment polls itself; once final it stops.
    fragment = client.get("/models/demo/versions/1/", HTTP_HX_REQUEST="true")
    assert b'hx-trigger="every 1s"' in fragment.content
    assert b"<html" not in fragment.content
    rows = client.get("/models/demo/", HTTP_HX_REQUEST="true")
    assert b'hx-trigger="every 1s"' in rows.content
    ModelVersion.objects.filter(pk=version.pk).update(status=VersionStatus.READY, progress=100)
    assert (
        b"hx-trigger" not in client.get("/models/demo/versions/1/", HTTP_HX_REQUEST="true").content
    )
    assert b"hx-trigger" not in client.get("/models/demo/", HTTP_HX_REQUEST="true").content


def test_docker_build_steps_fold_into_one_timeline_entry(personas: Personas) -> None:
    from portal.core.services import event_record

    model = Model.objects.create(team=personas.acme, name="demo")
    version = ready_version(model, 1)
    lines = [
        "Building the cpu runtime image",
        "Step 1/3 : ARG BASE_IMAGE",
        "Step 2/3 : FROM ${BASE_IMAGE}",
        "Step 3/3 : COPY app/ /app/",
        "Built image x",
    ]
    for line in lines:
        event_record(team=personas.acme, version=version, step="build", message=line)
    page = _signed_in("bob").get("/models/demo/versions/1/").content.decode()
    timeline = page[page.index('class="timeline"') :]
    assert timeline.count('<li class="tl-') == 3  # before, the folded steps, after
    assert "Docker build, 3 steps" in timeline
    assert "<code>Step 2/3 : FROM ${BASE_IMAGE}</code>" in timeline
    assert (
        timeline.index("Building the cpu")
        < timeline.index("Docker build")
        < timeline.index("Built image x")
    )


def test_failed_version_page_shows_the_cause(personas: Personas) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    version = ready_version(model, 1)
    version.step = "validate"
    version.save()
    version.mark_failed(
        code="not_onnx", message="The file is not an ONNX model: it could not be parsed"
    )
    page = _signed_in("bob").get("/models/demo/versions/1/")
    assert b"Validate failed:" in page.content
    assert b"The file is not an ONNX model" in page.content


def test_deploy_button_and_deployment_page(personas: Personas, onnx_file: Path) -> None:
    from portal.deployments.models import Deployment

    model = Model.objects.create(team=personas.acme, name="demo")
    ready_version(model, 1, onnx_file)
    client = _signed_in("bob")
    page = client.get("/models/demo/versions/1/")
    assert b"Deploy v1" in page.content
    response = client.post(
        "/models/demo/versions/1/deploy", {"deployment": "production", "device": "cpu"}
    )
    deployment = Deployment.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/deployments/{deployment.pk}/"
    detail = client.get(response["Location"])
    assert b"Deploying" in detail.content
    assert b'hx-trigger="every 1s"' in detail.content


@pytest.mark.parametrize(("who", "sees"), [("alice", True), ("bob", False)])
def test_only_admins_see_rollback(
    personas: Personas, onnx_file: Path, who: str, sees: bool
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    v1 = ready_version(model, 1, onnx_file)
    v2 = ready_version(model, 2, onnx_file)
    deployment = running_deployment(v1)
    from django.utils import timezone

    from portal.deployments.models import Revision

    newer = Revision.objects.create(
        deployment=deployment, version=v2, status="live", live_from=timezone.now()
    )
    Revision.objects.filter(pk=deployment.current_revision_id).update(status="superseded")
    deployment.current_revision = newer
    deployment.save()
    page = _signed_in(who).get(f"/deployments/{deployment.pk}/")
    assert page.status_code == 200
    assert b"curl -s -X POST" in page.content
    assert (b"Roll back to v1" in page.content) is sees
    refused = _signed_in("bob").post(
        f"/deployments/{deployment.pk}/rollback", {"version": 1}, follow=True
    )
    assert b"Only team admins can roll back" in refused.content


def test_tokens_page_shows_a_new_token_once(personas: Personas) -> None:
    client = _signed_in("bob")
    created = client.post("/accounts/tokens/", {"name": "ci"})
    assert b"Copy it now" in created.content
    token = created.context["new_token"]
    assert token.startswith("mp_")
    again = client.get("/accounts/tokens/")
    assert token.encode() not in again.content
    assert b"ci" in again.content


def test_try_it_calls_the_proxy_at_the_address_this_process_reaches(settings: object) -> None:
    from portal.deployments.views import _reachable_from_here

    settings.MODELPORT_PROXY_URL = "http://models.example.com"  # type: ignore[attr-defined]
    settings.MODELPORT_PROXY_CHECK_URL = "http://proxy:8080"  # type: ignore[attr-defined]
    assert _reachable_from_here("http://models.example.com/acme/m/prod/v2/models/m") == (
        "http://proxy:8080/acme/m/prod/v2/models/m"
    )
    assert _reachable_from_here("http://127.0.0.1:5000/v2/models/m") == (
        "http://127.0.0.1:5000/v2/models/m"
    )
