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
    try:
        services.version_process(version_id=version_id)
    except TrackingError as exc:
        if self.request.retries < len(RETRY_DELAYS):
            raise self.retry(exc=exc, countdown=RETRY_DELAYS[self.request.retries]) from exc
        version = ModelVersion.objects.select_related("model__team").get(pk=version_id)
        services.version_give_up(version=version, reason=exc.message)
