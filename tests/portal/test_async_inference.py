"""Async inference in the portal: queue figures in the API and on the page, the team's
callback secret, and what the dispatcher is told about each deployment."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from deployer.serving.async_spool import Spool
from portal.core.models import Event
from portal.deployments.async_inference import (
    deployment_spool_prepare,
    dispatch_targets,
    spool_path,
    team_callback_secret,
)
from portal.deployments.choices import DeploymentStatus
from portal.deployments.inference_keys import portal_headers
from portal.registry.models import Model
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment

pytestmark = pytest.mark.django_db


def _queued(personas: Personas, count: int) -> Any:
    model = Model.objects.create(team=personas.acme, name="demo")
    deployment = running_deployment(ready_version(model, 1))
    deployment_spool_prepare(deployment=deployment)
    spool = Spool(spool_path(deployment.pk))
    for _ in range(count):
        spool.submit(
            body=b"{}",
            model_name="demo",
            key_id="k_1",
            headers={},
            callback_url="",
            max_depth=100,
        )
    return deployment


def test_the_api_shows_queue_depth_and_the_oldest_age(personas: Personas) -> None:
    deployment = _queued(personas, 3)
    time.sleep(0.05)
    answer = personas.vera.client().get(f"/api/v1/deployments/{deployment.pk}/")
    assert answer.status_code == 200
    queue = answer.json()["async_queue"]
    assert queue["depth"] == 3
    assert queue["oldest_age_s"] >= 0.05
    assert queue["results"] == 0
    # Another team sees nothing of it.
    assert personas.charlie.client().get(f"/api/v1/deployments/{deployment.pk}/").status_code == 404


def test_the_page_shows_the_queue_and_refreshes_it(personas: Personas) -> None:
    deployment = _queued(personas, 2)
    client = Client()
    client.force_login(personas.vera.user)
    page = client.get(f"/deployments/{deployment.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Async requests" in html
    assert '<dd id="async-depth">2</dd>' in html
    part = client.get(f"/deployments/{deployment.pk}/?part=async", HTTP_HX_REQUEST="true")
    fragment = part.content.decode()
    assert fragment.lstrip().startswith('<section class="card" id="deployment-async"')
    assert '<dd id="async-depth">2</dd>' in fragment
    assert "<html" not in fragment


def test_only_team_admins_read_and_rotate_the_callback_secret(personas: Personas) -> None:
    url = "/api/v1/async/callback-secret"
    assert personas.bob.client().get(url).status_code == 403
    assert personas.vera.client().post(url).status_code == 403
    first = personas.alice.client().get(url).json()
    assert first["secret"].startswith("mpcs_")
    assert first["signature_header"] == "ModelPort-Signature"
    assert personas.alice.client().get(url).json()["secret"] == first["secret"]
    rotated = personas.alice.client().post(url).json()["secret"]
    assert rotated != first["secret"]
    assert team_callback_secret(team=personas.acme) == rotated
    assert Event.objects.filter(team=personas.acme, step="async").exists()
    # Each team has its own.
    theirs = personas.charlie.client().get(url).json()["secret"]
    assert theirs != rotated


def test_dispatch_targets_follow_the_rows(personas: Personas, settings: Any) -> None:
    deployment = _queued(personas, 1)
    settings.MODELPORT_PROXY_URL = "http://public.example:8080"
    settings.MODELPORT_PROXY_CHECK_URL = "http://proxy:8080"
    deployment.endpoint_url = "http://public.example:8080/acme/demo/production/v2/models/demo"
    deployment.save()
    [target] = dispatch_targets()
    assert target.deployment_id == deployment.pk
    # The portal's processes reach the proxy by its check URL, with the portal's key.
    assert target.infer_url == "http://proxy:8080/acme/demo/production/v2/models/demo/infer"
    assert target.headers == portal_headers(deployment.pk)
    assert target.callback_secret == team_callback_secret(team=personas.acme).encode()
    # No live instance: nothing is called (requests wait in the spool).
    deployment.status = DeploymentStatus.FAILED
    deployment.save()
    [target] = dispatch_targets()
    assert target.infer_url is None
    # A deleted deployment's spool is no target.
    deployment.delete()
    assert dispatch_targets() == []
