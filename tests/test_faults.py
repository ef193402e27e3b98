"""Crash safety on real parts: workers SIGKILLed mid-conversion, a version that kills its
worker every time, and Redis restarted while tasks wait. Every row ends final, nothing
is duplicated, attempts are counted. Figures go to artifacts/reports/crash_safety.json
(the image-build and rollout kills are in tests/test_containers_end_to_end.py)."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from portal.core.tasks import _sweep_converters
from portal.registry import services as registry_services
from portal.registry.choices import FINAL_VERSION_STATUSES, VersionStatus
from portal.registry.models import ModelVersion
from tests.conftest import Personas, Worker, report_entry, start_worker, wait_for
from tests.deployer.convert import conversion_models as cm
from tests.deployer.convert.conftest import converter_image, docker_engine  # noqa: F401
from tests.onnx_models import linear_model

pytestmark = pytest.mark.e2e


def _upload(personas: Personas, path: Path) -> ModelVersion:
    client = personas.alice.client()
    client.post("/api/v1/models/", {"name": "faults"}, format="json")
    with path.open("rb") as handle:
        response = client.post(
            "/api/v1/models/faults/versions/", {"file": handle}, format="multipart"
        )
    assert response.status_code == 202, response.content
    return ModelVersion.objects.get(model__name="faults", number=response.json()["number"])


def _age(version: ModelVersion) -> None:
    ModelVersion.objects.filter(pk=version.pk).update(
        updated_at=timezone.now() - timedelta(seconds=settings.MODELPORT_STALE_AFTER_S + 5)
    )


def _in_sandbox(version: ModelVersion, docker: Any) -> Any:
    """The converter container of this version, once it is running."""
    containers = docker.containers.list(
        filters={"label": f"modelport.version-uid={version.uid}", "status": "running"}
    )
    return containers[0] if containers else None


def _mlflow_versions(version: ModelVersion) -> int:
    from mlflow import MlflowClient

    uri = settings.MLFLOW_TRACKING_URI
    found = MlflowClient(uri, registry_uri=uri).search_model_versions(
        f"name = '{version.model.mlflow_name}' and tags.modelport_version_uid = '{version.uid}'"
    )
    return len(found)


def _converter_containers(docker: Any) -> int:
    return len(docker.containers.list(all=True, filters={"label": "modelport.role=converter"}))


def _kill_during_conversion(
    version: ModelVersion, worker: Worker, docker: Any, settings: Any
) -> dict[str, int]:
    """Wait until the version converts in its sandbox, SIGKILL the worker, then do what
    the periodic reconcile does once the row is stale: remove the abandoned sandbox and
    hand the version back (or end it)."""
    wait_for(lambda: _in_sandbox(version, docker), timeout_s=120, interval_s=0.1,
             what="the conversion container")  # fmt: skip
    worker.kill()
    version.refresh_from_db()
    assert version.status == VersionStatus.CONVERTING
    settings.MODELPORT_CONVERSION_TIMEOUT_S = -60  # every converter counts as abandoned
    assert _sweep_converters() >= 1
    _age(version)
    return registry_services.versions_reconcile()


def test_worker_killed_mid_conversion_finishes_after_reconcile(
    converter_image: str,  # noqa: F811
    personas: Personas,
    celery_worker: Worker,
    tmp_path: Path,
    settings: Any,
) -> None:
    import docker as docker_sdk

    docker = docker_sdk.from_env()
    cm.slow_pickle(tmp_path / "slow.pkl", seconds=6)
    version = _upload(personas, tmp_path / "slow.pkl")
    counts = _kill_during_conversion(version, celery_worker, docker, settings)
    assert version.attempts == 1
    assert counts == {"requeued": 1, "failed": 0}
    again = start_worker(celery_worker.env, tmp_path / "worker-2.log")
    try:
        wait_for(
            lambda: ModelVersion.objects.filter(
                pk=version.pk, status__in=FINAL_VERSION_STATUSES
            ).exists(),
            timeout_s=240,
            what="the conversion after the restart",
        )
    finally:
        again.stop()
    version.refresh_from_db()
    assert version.status == VersionStatus.READY, version.error
    assert version.attempts == 2
    duplicates = (_mlflow_versions(version) - 1) + _converter_containers(docker)
    assert duplicates == 0
    report_entry(
        "crash_safety",
        {"scenario": "worker SIGKILL during conversion", "kills": 1, "final": True,
         "status": version.status, "attempts": version.attempts, "duplicates": duplicates},
    )  # fmt: skip


def test_version_that_kills_its_worker_every_time_ends_failed(
    converter_image: str,  # noqa: F811
    personas: Personas,
    celery_worker: Worker,
    tmp_path: Path,
    settings: Any,
) -> None:
    import docker as docker_sdk

    docker = docker_sdk.from_env()
    cm.slow_pickle(tmp_path / "slower.pkl", seconds=120)
    version = _upload(personas, tmp_path / "slower.pkl")
    worker = celery_worker
    kills = 0
    for attempt in range(1, settings.MODELPORT_TASK_MAX_ATTEMPTS + 1):
        counts = _kill_during_conversion(version, worker, docker, settings)
        kills += 1
        assert version.attempts == attempt
        if attempt < settings.MODELPORT_TASK_MAX_ATTEMPTS:
            assert counts == {"requeued": 1, "failed": 0}
            worker = start_worker(celery_worker.env, tmp_path / f"worker-{attempt + 1}.log")
        else:
            assert counts == {"requeued": 0, "failed": 1}
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED
    assert version.error_code == "gave_up"
    assert f"after {settings.MODELPORT_TASK_MAX_ATTEMPTS} attempts" in version.error
    assert _converter_containers(docker) == 0
    report_entry(
        "crash_safety",
        {"scenario": "a version that kills its worker on every attempt", "kills": kills,
         "final": True, "status": version.status, "attempts": version.attempts,
         "duplicates": 0},
    )  # fmt: skip


def test_redis_restarted_while_tasks_wait(
    personas: Personas, celery_worker: Worker, tmp_path: Path
) -> None:
    """Tasks queued in a Redis that restarts without persistence are lost as messages;
    reconcile hands their rows back to a worker, so no work is lost."""
    import redis

    celery_worker.stop()  # nobody consumes: the tasks wait in Redis
    uploads = []
    for seed in range(3):
        path = tmp_path / f"m{seed}.onnx"
        linear_model(path, seed=100 + seed)
        uploads.append(_upload(personas, path))
    broker = redis.Redis.from_url(celery_worker.env["CELERY_BROKER_URL"])
    assert broker.llen("pipeline") == 3
    _restart_redis(broker)
    lost = 3 - broker.llen("pipeline")
    again = start_worker(celery_worker.env, tmp_path / "worker-2.log")
    try:
        for version in uploads:
            ModelVersion.objects.filter(pk=version.pk).update(
                updated_at=timezone.now() - timedelta(seconds=120)
            )
        counts = registry_services.versions_reconcile()
        assert counts["requeued"] == lost
        wait_for(
            lambda: (
                ModelVersion.objects.filter(
                    pk__in=[v.pk for v in uploads], status=VersionStatus.READY
                ).count()
                == 3
            ),
            timeout_s=240,
            what="every queued version",
        )
    finally:
        again.stop()
    duplicates = sum(_mlflow_versions(v) - 1 for v in uploads)
    assert duplicates == 0
    report_entry(
        "crash_safety",
        {"scenario": "Redis restarted with 3 tasks queued", "kills": 0, "final": True,
         "messages_lost": lost, "requeued_by_reconcile": counts["requeued"],
         "duplicates": duplicates},
    )  # fmt: skip


def _restart_redis(client: Any) -> None:
    port = client.connection_pool.connection_kwargs.get("port", 6379)
    import contextlib

    import redis

    with contextlib.suppress(redis.ConnectionError):
        client.shutdown(nosave=True)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--port", str(port), "--save", ""], check=True
    )
    wait_for(lambda: _pings(client), timeout_s=30, what="Redis to come back")


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
