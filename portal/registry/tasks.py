"""Celery tasks for the version pipeline: thin, id-taking, idempotent."""

from __future__ import annotations

from celery import shared_task
from celery.app.task import Task

from deployer.errors import TrackingError
from portal.registry import services
from portal.registry.models import ModelVersion

RETRY_DELAYS = (5, 30, 120)


@shared_task(bind=True, acks_late=True, max_retries=len(RETRY_DELAYS))
def version_process(self: Task, version_id: int) -> None:
    """Validate and register one version (safe to run again: done steps are skipped)."""
    run_pipeline(self, version_id, engine_access=False)


def run_pipeline(task: Task, version_id: int, *, engine_access: bool) -> None:
    """The pipeline with MLflow outages retried with backoff, then given up on."""
    try:
        services.version_process(version_id=version_id, engine_access=engine_access)
    except TrackingError as exc:
        if task.request.retries < len(RETRY_DELAYS):
            raise task.retry(exc=exc, countdown=RETRY_DELAYS[task.request.retries]) from exc
        version = ModelVersion.objects.select_related("model__team").get(pk=version_id)
        services.version_give_up(version=version, reason=exc.message)
