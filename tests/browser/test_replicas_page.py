"""The deployment page's replica table in Chromium: it follows the rows live (htmx), the
status badge elsewhere on the page too; photographed under artifacts/screenshots/."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from portal.deployments.choices import DeploymentStatus, ReplicaState
from portal.deployments.models import Deployment, Replica
from portal.registry.models import Model
from tests.browser.conftest import PageWatch, shoot
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment

pytestmark = [pytest.mark.browser]


@pytest.mark.django_db(transaction=True)
def test_the_replica_table_follows_a_death_live(
    browser: Any, personas: Personas, live_server: Any, onnx_file: Any
) -> None:
    deployment = running_deployment(
        ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file),
        min_replicas=2,
        max_replicas=2,
    )
    revision = deployment.current_revision
    now = timezone.now()
    rows = [
        Replica.objects.create(
            revision=revision,
            deployment=deployment,
            slot=slot,
            state=ReplicaState.READY,
            runtime="local",
            handle=f"proc-{100 + slot}-1",
            internal_url=f"http://127.0.0.1:{40000 + slot}",
            started_at=now,
            ready_at=now,
            rate_per_s=71.5 + slot,
            p99_ms=4.2,
            inflight=1.3,
        )
        for slot in (0, 1)
    ]
    base = live_server.url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page, base)
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("User name").fill("bob")
    page.get_by_label("Password").fill("bob-password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")
    page.goto(f"{base}/deployments/{deployment.pk}/")
    table = page.get_by_test_id("replica-table")
    assert table.locator("[data-state=ready]").count() == 2
    assert "71.5" in table.inner_text()
    assert "4.2 ms" in table.inner_text()
    assert "1.3" in table.inner_text()  # requests in flight, what autoscaling reads
    assert page.get_by_test_id("replica-count").inner_text() == "2 of 2 ready"
    shoot(page, "deployment-replicas")

    # What the watcher writes when a replica dies; the page follows without a reload.
    Replica.objects.filter(pk=rows[0].pk).update(
        state=ReplicaState.FAILED, cause="killed by signal SIGKILL", ended_at=timezone.now()
    )
    Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.DEGRADED)
    page.get_by_text("killed by signal SIGKILL").wait_for(timeout=15000)
    page.get_by_test_id("replica-count").filter(has_text="1 of 2 ready").wait_for(timeout=15000)
    page.locator("#deployment-status-badge", has_text="degraded").wait_for(timeout=15000)
    shoot(page, "deployment-replica-died")
    watch.check()
