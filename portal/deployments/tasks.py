"""Celery tasks for rollouts and teardowns (queue ``deploy``): thin, id-taking, idempotent."""

from __future__ import annotations

from celery import shared_task
from celery.app.task import Task

from deployer.images.build import EngineUnavailable
from portal.deployments import services
from portal.registry.tasks import RETRY_DELAYS as PIPELINE_RETRY_DELAYS
from portal.registry.tasks import run_pipeline

# Docker not answering is worth waiting for (a restarting engine); other failures are final.
BUILD_RETRY_DELAYS = (5, 30, 120)


@shared_task(acks_late=True)
def revision_rollout(revision_id: int) -> None:
    """Roll out one revision (a redelivery restarts an interrupted rollout cleanly)."""
    services.revision_rollout(revision_id=revision_id)


@shared_task(acks_late=True)
def deployment_teardown(deployment_id: int, delete: bool) -> None:
    """Stop a deployment's instances (and delete it when asked)."""
    services.deployment_teardown(deployment_id=deployment_id, delete=delete)


@shared_task(bind=True, acks_late=True, max_retries=len(PIPELINE_RETRY_DELAYS))
def version_convert(self: Task, version_id: int) -> None:
    """The version pipeline where it needs a sandbox container: on this queue because only
    this worker talks to Docker."""
    run_pipeline(self, version_id, engine_access=True)


@shared_task(bind=True, acks_late=True, max_retries=len(BUILD_RETRY_DELAYS))
def version_build(self: Task, version_id: int) -> None:
    """Build a version's model image: on this queue because only this worker talks to Docker."""
    from portal.registry import services as registry_services
    from portal.registry.models import ModelVersion

    try:
        registry_services.version_build(version_id=version_id)
    except EngineUnavailable as exc:
        if self.request.retries < len(BUILD_RETRY_DELAYS):
            raise self.retry(exc=exc, countdown=BUILD_RETRY_DELAYS[self.request.retries]) from exc
        version = ModelVersion.objects.select_related("model__team").get(pk=version_id)
        registry_services.version_give_up(version=version, reason=exc.message)
