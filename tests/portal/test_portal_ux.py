"""Portal details people tripped over: rollback offers, long text, sizes, version numbers."""

from __future__ import annotations

import random
from pathlib import Path

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone

from deployer.images import docker_client
from deployer.units import format_bytes
from portal.core.models import Event
from portal.deployments import selectors
from portal.deployments.choices import RevisionStatus
from portal.deployments.models import Deployment, Revision
from portal.registry import services as registry_services
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas
from tests.onnx_models import linear_model
from tests.portal.factories import ready_version, running_deployment


def _signed_in(username: str) -> Client:
    client = Client()
    assert client.login(username=username, password=f"{username}-password")
    return client


def _switch_to(deployment: Deployment, version: ModelVersion) -> None:
    """Record that ``version`` went live on the deployment and replaced what served."""
    assert deployment.current_revision is not None
    Revision.objects.filter(pk=deployment.current_revision.pk).update(
        status=RevisionStatus.SUPERSEDED, live_until=timezone.now()
    )
    newer = Revision.objects.create(
        deployment=deployment, version=version, status=RevisionStatus.LIVE,
        live_from=timezone.now(),
    )  # fmt: skip
    deployment.current_revision = newer
    deployment.save()


def test_rollback_is_offered_only_to_versions_that_went_live_here(personas: Personas) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    v1, v2, v3 = (ready_version(model, n) for n in (1, 2, 3))
    deployment = running_deployment(v1)
    _switch_to(deployment, v2)
    # v3's rollout failed its known-answer check: it never served this endpoint.
    Revision.objects.create(
        deployment=deployment, version=v3, status=RevisionStatus.FAILED, error="wrong answer"
    )
    # v3 did go live on another deployment; that does not make it a rollback target here.
    running_deployment(v3, name="staging")

    assert selectors.deployment_rollback_targets(deployment=deployment) == [v1]

    page = _signed_in("alice").get(f"/deployments/{deployment.pk}/")
    assert b'data-testid="rollback-v1"' in page.content
    assert b"Roll back to v1" in page.content
    assert b"Roll back to v3" not in page.content
    assert b"Roll back to v2" not in page.content  # serving now

    # The version pages offer the same: production can go back to v1, never "back" to v3.
    assert selectors.version_rollback_deployments(version=v1) == [deployment]
    assert selectors.version_rollback_deployments(version=v3) == []
    admin = _signed_in("alice")
    assert b"Roll production back to v1" in admin.get("/models/demo/versions/1/").content
    v3_page = admin.get("/models/demo/versions/3/").content
    assert b"Roll production back to v3" not in v3_page
    assert b"Roll staging back" not in v3_page  # staging serves v3 itself


def test_rollback_targets_leave_out_a_version_no_longer_ready(personas: Personas) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    v1, v2 = ready_version(model, 1), ready_version(model, 2)
    deployment = running_deployment(v1)
    _switch_to(deployment, v2)
    ModelVersion.objects.filter(pk=v1.pk).update(status="failed")
    assert selectors.deployment_rollback_targets(deployment=deployment) == []


def test_model_list_shows_the_whole_description_under_the_name(personas: Personas) -> None:
    text = "Scores card transactions for fraud in real time; " * 4
    Model.objects.create(team=personas.acme, name="fraud", description=text.strip())
    essay = "x" * 600
    Model.objects.create(team=personas.acme, name="essay", description=essay)
    page = _signed_in("bob").get("/").content.decode()
    fraud = page.split('data-testid="model-description"')[2]  # rows are sorted by name
    assert fraud.split("</p>")[0].endswith(">" + text.strip())
    assert 'class="muted clip hide-sm"' not in page  # was one clipped line, hidden on phones
    # An essay shows its first 280 characters; all of it is in the tooltip and on its page.
    assert f'title="{essay}"' in page
    assert ("x" * 279 + "…") in page


def test_version_page_and_its_timeline_write_image_sizes_the_same_way(
    docker_mode: None, personas: Personas, tmp_path: Path
) -> None:
    """A real model-image build: the Serving image card, the timeline entry and the
    build log give the same figures in the same units (it read 336 MB vs 320.7 MB)."""
    model = Model.objects.create(team=personas.acme, name="sizes")
    path = tmp_path / "m.onnx"
    linear_model(path, seed=random.randrange(1 << 30))  # new content: really built
    version = registry_services.version_upload(
        model=model, file=SimpleUploadedFile(path.name, path.read_bytes()), user=personas.bob.user
    )
    registry_services.version_process(version_id=version.pk)
    registry_services.version_build(version_id=version.pk)
    version.refresh_from_db()
    assert version.is_ready, version.error
    try:
        image = version.report["image"]
        total, layer = (
            format_bytes(image["image_size_bytes"]),
            format_bytes(image["image_model_layer_bytes"]),
        )
        page = _signed_in("bob").get(f"/models/sizes/versions/{version.number}/").content.decode()
        assert f"<dt>Image size</dt><dd>{total}</dd>" in page
        assert f"<dt>Model layer</dt><dd>{layer}</dd>" in page
        built = Event.objects.get(version=version, step="build", message__startswith="Built image")
        assert f"model layer {layer}, image {total}" in built.message
        build_log = (version.storage_dir / "build.log").read_text()
        assert f"model layer {layer}, image {total}" in build_log
        assert " MB" not in page.split('id="image-title"')[1].split("</section>")[0]
    finally:
        docker_client().images.remove(version.image_ref, force=True)


def test_version_pages_say_which_number_is_modelports_and_which_is_mlflows(
    personas: Personas,
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    ready_version(model, 1)  # never registered (say it failed before MLflow)
    v2 = ready_version(model, 2)
    ModelVersion.objects.filter(pk=v2.pk).update(mlflow_version="1", mlflow_run_id="r1")
    client = _signed_in("vera")

    page = client.get("/models/demo/versions/2/").content.decode()
    numbers = page.split('data-testid="version-numbers"')[1].split("</p>")[0]
    assert "<strong>v2</strong> is ModelPort's number" in numbers
    assert "<strong>version 1</strong> of <code>acme.demo</code>" in numbers
    unregistered = client.get("/models/demo/versions/1/").content.decode()
    assert "MLflow gives it its own version number once it is registered" in unregistered

    listing = client.get("/models/demo/").content.decode()
    assert "the MLflow column is the version number MLflow's registry gave it" in listing
    assert '<span data-testid="mlflow-version-2">1</span>' in listing
    assert 'data-testid="mlflow-version-1"' not in listing
