"""The periodic metrics scrape."""

from __future__ import annotations

from celery import shared_task

from portal.celery import QUEUE_DEPLOY
from portal.monitoring.services import metrics_scrape as scrape


@shared_task(ignore_result=True, expires=30, queue=QUEUE_DEPLOY)
def metrics_scrape() -> int:
    """Sample every live instance's counters."""
    return scrape()
