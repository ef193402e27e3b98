"""Celery tasks for the version pipeline: thin, id-taking, idempotent.

``version_process`` runs on the ``pipeline`` queue (no Docker); ``version_convert`` and
``version_build`` need the Docker engine and run long, so they have the ``convert`` queue
and its workers to themselves, away from rollouts and rollbacks.
"""

from __future__ import annotations

from celery import shared_task
from celery.app.task import Task

from deployer.errors import TrackingError
from deployer.images.build import EngineUnavailable
from portal.celery import QUEUE_CONVERT, QUEUE_PIPELINE
from portal.registry import services
from portal.registry.models import ModelVersion

RETRY_DELAYS = (5, 30, 120)
# Docker not answering is worth waiting for (a restarting engine); other failures are final.
BUILD_RETRY_DELAYS = (5, 30, 120)


@shared_task(bind=True, acks_late=True, max_retries=len(RETRY_DELAYS), queue=QUEUE_PIPELINE)
def version_process(self: Task, version_id: int) -> None:
    """Validate and register one version (safe to run again: done steps are skipped)."""
    run_pipeline(self, version_id, engine_access=False)


@shared_task(bind=True, acks_late=True, max_retries=len(RETRY_DELAYS), queue=QUEUE_CONVERT)
def version_convert(self: Task, version_id: int) -> None:
    """The version pipeline where it needs a sandbox container (a worker with Docker)."""
    run_pipeline(self, version_id, engine_access=True)


@shared_task(bind=True, acks_late=True, max_retries=len(BUILD_RETRY_DELAYS), queue=QUEUE_CONVERT)
def version_build(self: Task, version_id: int) -> None:
    """Build a version's model image (a worker with Docker)."""
    try:
        services.version_build(version_id=version_id)
    except EngineUnavailable as exc:
        if self.request.retries < len(BUILD_RETRY_DELAYS):
            raise self.retry(exc=exc, countdown=BUILD_RETRY_DELAYS[self.request.retries]) from exc
        version = ModelVersion.objects.select_related("model__team").get(pk=version_id)
        services.version_give_up(version=version, reason=exc.message)


def run_pipeline(task: Task, version_id: int, *, engine_access: bool) -> None:
    """The pipeline with MLflow outages retried with backoff, then given up on."""
    try:
        services.version_process(version_id=version_id, engine_access=engine_access)
    except TrackingError as exc:
        if task.request.retries < len(RETRY_DELAYS):
            raise task.retry(exc=exc, countdown=RETRY_DELAYS[task.request.retries]) from exc
        version = ModelVersion.objects.select_related("model__team").get(pk=version_id)
        services.version_give_up(version=version, reason=exc.message)


@shared_task(queue="deploy", acks_late=True, ignore_result=True)
def storage_collect(deleted_models: list[str] | None = None) -> dict[str, int]:
    """Storage GC (files, model images, containers, MLflow marks): on the deploy queue,
    because only that worker talks to the Docker engine. Safe to run again."""
    from portal.registry.storage import storage_collect as collect

    return collect(deleted_models=deleted_models).as_dict()
