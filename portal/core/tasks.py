"""The periodic reconcile task."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from deployer.convert.runner import sweep_containers
from deployer.images.build import EngineUnavailable, docker_client
from portal.celery import QUEUE_DEPLOY
from portal.core.idempotency import idempotency_records_expire
from portal.deployments.services import deployments_reconcile
from portal.registry.services import versions_reconcile


@shared_task(acks_late=True, queue=QUEUE_DEPLOY)
def reconcile() -> dict[str, dict[str, int]]:
    """Bring rows and running instances back into agreement; remove conversion containers a
    killed worker left behind; forget old idempotency keys."""
    return {
        "versions": versions_reconcile(),
        "deployments": deployments_reconcile(),
        "converters": {"removed": _sweep_converters()},
        "idempotency": {"expired": idempotency_records_expire()},
    }


def _sweep_converters() -> int:
    if settings.MODELPORT_CONVERSION_SANDBOX == "local":
        return 0
    try:
        client = docker_client(timeout_s=30)
    except EngineUnavailable:
        return 0
    # Older than the longest a conversion may run: nobody is waiting for it any more.
    return sweep_containers(client, older_than_s=settings.MODELPORT_CONVERSION_TIMEOUT_S + 60)
