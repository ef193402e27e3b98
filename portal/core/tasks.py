"""The periodic reconcile task."""

from __future__ import annotations

from celery import shared_task

from portal.core.idempotency import idempotency_records_expire
from portal.deployments.services import deployments_reconcile
from portal.registry.services import versions_reconcile


@shared_task(acks_late=True)
def reconcile() -> dict[str, dict[str, int]]:
    """Bring rows and running instances back into agreement; forget old idempotency keys."""
    return {
        "versions": versions_reconcile(),
        "deployments": deployments_reconcile(),
        "idempotency": {"expired": idempotency_records_expire()},
    }
