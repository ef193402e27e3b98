"""Celery tasks for rollouts and teardowns (queue ``deploy``): thin, id-taking, idempotent."""

from __future__ import annotations

from celery import shared_task

from portal.deployments import services


@shared_task(acks_late=True)
def revision_rollout(revision_id: int) -> None:
    """Roll out one revision (a redelivery restarts an interrupted rollout cleanly)."""
    services.revision_rollout(revision_id=revision_id)


@shared_task(acks_late=True)
def deployment_teardown(deployment_id: int, delete: bool) -> None:
    """Stop a deployment's instances (and delete it when asked)."""
    services.deployment_teardown(deployment_id=deployment_id, delete=delete)
