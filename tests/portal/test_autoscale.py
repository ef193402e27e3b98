"""Autoscaling under load: the watcher reads each replica's requests in flight from its
metrics, decides, and the deploy worker starts or stops replicas to match, with not one
request failing. Real parts as in ``test_replicas``: the managed nginx, local serving
processes, a Celery worker on the deploy queue, the watcher process, PostgreSQL, Redis.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from portal.accounts.services import key_create
from portal.core.models import Event
from portal.deployments import replicas, services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment, Replica
from portal.registry.models import ModelVersion
from tests.conftest import Personas, Worker, report_entry, wait_for
from tests.portal.factories import ready_version, running_deployment
from tests.portal.test_replicas import Load, _ready, healing, version  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture
def worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    """The watcher reads the replicas' metrics every second (5 s by default)."""
    return {**worker_env, "MODELPORT_REPLICA_METRICS_S": "1"}


def test_the_step_decides_from_fresh_measurements_of_every_replica(
    personas: Personas,
) -> None:
    from django.utils import timezone

    from portal.deployments.choices import ReplicaState
    from portal.registry.models import Model

    model = Model.objects.create(team=personas.acme, name="demo")
    deployment = running_deployment(ready_version(model, 1), min_replicas=1, max_replicas=4)
    revision = deployment.current_revision
    assert revision is not None
    one = Replica.objects.create(
        revision=revision, deployment=deployment, slot=0, state=ReplicaState.READY,
        inflight=3.1, metrics_at=timezone.now(),
    )  # fmt: skip
    # Autoscaling off: nothing is decided, whatever the load.
    assert replicas.deployment_autoscale(deployment_id=deployment.pk) == ""
    Deployment.objects.filter(pk=deployment.pk).update(autoscale_target_inflight=1.0)
    # A replica not measured yet: wait.
    two = Replica.objects.create(
        revision=revision, deployment=deployment, slot=1, state=ReplicaState.READY
    )
    Deployment.objects.filter(pk=deployment.pk).update(replica_target=2)
    assert replicas.deployment_autoscale(deployment_id=deployment.pk) == ""
    Replica.objects.filter(pk=two.pk).update(inflight=2.0, metrics_at=timezone.now())
    decision = replicas.deployment_autoscale(deployment_id=deployment.pk)
    assert decision == (
        "2 → 4 replicas: 2.55 requests in flight per replica, over the target of 1 "
        "(6 needed, the maximum is 4)"
    )
    deployment.refresh_from_db()
    assert (deployment.replica_target, deployment.replicas_wanted) == (4, 4)
    assert deployment.scaled_at is not None
    event = Event.objects.get(deployment=deployment, step="autoscale")
    assert event.message == decision
    assert event.data["replicas"] == 4
    # Stale measurements decide nothing.
    Replica.objects.filter(pk=one.pk).update(metrics_at=timezone.now() - timedelta(seconds=60))
    assert replicas.deployment_autoscale(deployment_id=deployment.pk) == ""


def test_load_adds_replicas_and_a_lull_takes_them_away_with_no_failed_request(
    personas: Personas,
    version: tuple[ModelVersion, np.ndarray],  # noqa: F811
    healing: Worker,  # noqa: F811
) -> None:
    made, want = version
    first = services.deployment_deploy(version=made, name="production", user=personas.bob.user)
    deployment = wait_for(  # the deploy worker rolls it out
        lambda: Deployment.objects.filter(
            pk=first.deployment_id, status__in=[DeploymentStatus.RUNNING, DeploymentStatus.FAILED]
        ).first(),
        timeout_s=180, what="the rollout",
    )  # fmt: skip
    assert deployment.status == DeploymentStatus.RUNNING, deployment.error
    # 150 req/s of ~1 ms requests is ~0.15 in flight: a target of 0.02 needs the maximum.
    answer = personas.bob.client().patch(
        f"/api/v1/deployments/{deployment.pk}/",
        {"max_replicas": 3, "autoscale_target_inflight": 0.02, "autoscale_cooldown_s": 3},
        format="json",
    )
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert (body["min_replicas"], body["max_replicas"], body["replicas_wanted"]) == (1, 3, 1)
    assert body["autoscale_target_inflight"] == 0.02

    _, key = key_create(team=personas.acme, user=personas.bob.user, name="load")
    load = Load(
        url=f"{deployment.endpoint_url}/infer", headers={"Authorization": f"Bearer {key}"},
        want=want,
    )  # fmt: skip
    load.start()
    started = time.monotonic()
    timeline: list[tuple[float, int]] = []

    def replicas_at(count: int) -> bool:
        ready = len(_ready(deployment))
        if not timeline or timeline[-1][1] != ready:
            timeline.append((round(time.monotonic() - started, 1), ready))
        return ready == count

    try:
        wait_for(lambda: replicas_at(3), timeout_s=120, interval_s=0.2, what="3 replicas")
        scaled_up_s = time.monotonic() - started
        time.sleep(3)  # the new replicas serve under load
    finally:
        load.finish()
    lull = time.monotonic()
    wait_for(lambda: replicas_at(1), timeout_s=120, interval_s=0.2, what="back to 1 replica")
    scaled_down_s = time.monotonic() - lull

    assert load.failures == [], load.failures[:5]
    assert load.ok > 100
    decisions = [e.message for e in Event.objects.filter(deployment=deployment, step="autoscale")]
    assert any(m.startswith("1 → ") and "over the target of 0.02" in m for m in decisions), (
        decisions
    )
    assert any("under the target of 0.02" in m for m in decisions), decisions
    final = Deployment.objects.get(pk=deployment.pk)
    assert final.status == DeploymentStatus.RUNNING
    assert final.replicas_wanted == 1
    figures: dict[str, Any] = {
        "requests": load.ok + len(load.failures),
        "failed": len(load.failures),
        "rate_per_s": round(load.rate, 1),
        "to_3_replicas_s": round(scaled_up_s, 1),
        "back_to_1_s": round(scaled_down_s, 1),
        "ready_replicas_over_time": timeline,
        "decisions": decisions,
    }
    report_entry("autoscale", figures)
    print(f"\nautoscale: {figures}")
