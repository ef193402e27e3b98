"""Metrics: parsing the runtime's exposition, quantiles, and rates per interval."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from deployer.monitoring import parse_metrics, quantile
from portal.monitoring.models import MetricSample
from portal.monitoring.selectors import deployment_series
from portal.registry.models import Model
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment

EXPOSITION = """\
# TYPE nv_inference_request_success counter
nv_inference_request_success_total{model="m",version="1"} 40.0
# TYPE nv_inference_request_failure counter
nv_inference_request_failure_total{model="m",version="1",reason="REJECTED"} 2.0
nv_inference_request_failure_total{model="m",version="1",reason="OTHER"} 1.0
# TYPE modelport_request_duration_seconds histogram
modelport_request_duration_seconds_bucket{model="m",version="1",le="0.001"} 10.0
modelport_request_duration_seconds_bucket{model="m",version="1",le="0.01"} 30.0
modelport_request_duration_seconds_bucket{model="m",version="1",le="+Inf"} 40.0
modelport_request_duration_seconds_sum{model="m",version="1"} 0.2
modelport_request_duration_seconds_count{model="m",version="1"} 40.0
"""


def test_parse_metrics() -> None:
    snapshot = parse_metrics(EXPOSITION)
    assert snapshot.success == 40
    assert snapshot.failure == 3
    assert snapshot.latency_buckets == [(0.001, 10.0), (0.01, 30.0), (math.inf, 40.0)]


def test_quantile_interpolates_inside_buckets() -> None:
    buckets = [(0.001, 10.0), (0.01, 30.0), (math.inf, 40.0)]
    assert quantile(buckets, 0.25) == pytest.approx(0.001)
    assert quantile(buckets, 0.5) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile(buckets, 0.99) == pytest.approx(0.01)
    assert quantile([], 0.5) is None
    assert quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5) is None


def test_series_gives_rates_and_skips_counter_restarts(personas: Personas) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    deployment = running_deployment(ready_version(model, 1))
    revision = deployment.current_revision
    assert revision is not None
    start = timezone.now() - timedelta(minutes=5)

    def sample(seconds: int, success: float, failure: float, fast: float, total: float) -> None:
        MetricSample.objects.create(
            deployment=deployment,
            revision=revision,
            taken_at=start + timedelta(seconds=seconds),
            success=success,
            failure=failure,
            latency_buckets=[[0.005, fast], ["+Inf", total]],
        )

    sample(0, 100, 0, 100, 100)
    sample(10, 300, 10, 250, 300)  # 210 requests in 10 s, 10 failed; 150 of 200 fast
    sample(20, 5, 0, 5, 5)  # the counters restarted: no point for this interval
    points = deployment_series(deployment=deployment)
    assert len(points) == 1
    assert points[0].requests_per_s == pytest.approx(21.0)
    assert points[0].errors_per_s == pytest.approx(1.0)
    assert points[0].p50_ms == pytest.approx(5 * 100 / 150)


def test_series_adds_up_the_replicas_sampled_at_both_ends(personas: Personas) -> None:
    from portal.deployments.models import Replica

    model = Model.objects.create(team=personas.acme, name="demo")
    deployment = running_deployment(ready_version(model, 1))
    revision = deployment.current_revision
    assert revision is not None
    one, two, three = (
        Replica.objects.create(revision=revision, deployment=deployment, slot=slot)
        for slot in range(3)
    )
    start = timezone.now() - timedelta(minutes=5)

    def sample(replica: Any, seconds: int, success: float, fast: float) -> None:
        MetricSample.objects.create(
            deployment=deployment, revision=revision, replica=replica,
            taken_at=start + timedelta(seconds=seconds), success=success, failure=0,
            latency_buckets=[[0.005, fast], [0.05, success], ["+Inf", success]],
        )  # fmt: skip

    sample(one, 0, 100, 100)
    sample(two, 0, 50, 50)
    sample(one, 10, 200, 200)  # +100, all fast
    sample(two, 10, 150, 50)  # +100, all slow
    sample(three, 10, 30, 30)  # new at this scrape: not in this interval
    sample(one, 20, 300, 300)  # +100
    sample(two, 20, 7, 7)  # restarted: left out of this interval
    sample(three, 20, 80, 80)  # +50
    first, second = deployment_series(deployment=deployment)
    assert first.requests_per_s == pytest.approx(20.0)  # both replicas, not one of them
    assert first.p50_ms == pytest.approx(5.0)  # half of the 200 were within 5 ms
    assert first.p99_ms is not None
    assert first.p99_ms > 5.0
    assert second.requests_per_s == pytest.approx(15.0)
    assert second.p99_ms == pytest.approx(5.0 * 0.99)
    assert (first.replicas, second.replicas) == (3.0, 3.0)  # the page's replicas chart


def test_scrape_reads_a_real_instance(personas: Personas, tmp_path: Path) -> None:
    import requests

    from deployer.checks import wait_until_ready
    from deployer.runtimes.base import InstanceState, LaunchSpec
    from portal.core import engine
    from portal.deployments.models import Revision
    from portal.monitoring.services import metrics_scrape
    from tests.onnx_models import linear_model

    model = Model.objects.create(team=personas.acme, name="demo")
    path = tmp_path / "m.onnx"
    linear_model(path)
    version = ready_version(model, 1, path)
    deployment = running_deployment(version)
    runtime = engine.runtime()
    launch = runtime.start(
        LaunchSpec(deployment_id=deployment.pk, revision_id=1, model_name="demo",
                   model_version="1", model_path=path)
    )  # fmt: skip
    try:
        wait_until_ready(
            launch.url, "demo", timeout_s=60,
            still_running=lambda: runtime.status(launch.handle).state == InstanceState.RUNNING,
            describe_failure=lambda: runtime.logs(launch.handle),
        )  # fmt: skip
        Revision.objects.filter(pk=deployment.current_revision_id).update(
            metrics_url=launch.metrics_url
        )
        for _ in range(5):
            requests.post(
                f"{launch.url}/v2/models/demo/infer",
                json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                  "data": [1, 2, 3, 4]}]},
                timeout=5,
            )  # fmt: skip
        assert metrics_scrape() == 1
        sample = MetricSample.objects.get()
        assert sample.success >= 5
        # With replica rows, each serving replica is sampled (not the revision's address).
        from portal.deployments.choices import ReplicaState
        from portal.deployments.models import Replica

        replica = Replica.objects.create(
            revision_id=deployment.current_revision_id, deployment=deployment, slot=0,
            state=ReplicaState.READY, metrics_url=launch.metrics_url,
        )  # fmt: skip
        Replica.objects.create(
            revision_id=deployment.current_revision_id, deployment=deployment, slot=1,
            state=ReplicaState.FAILED, metrics_url="http://127.0.0.1:9/metrics",
        )  # fmt: skip
        assert metrics_scrape() == 1
        assert MetricSample.objects.latest("id").replica == replica
    finally:
        runtime.stop(launch.handle, grace_s=1)
