"""Scraping live instances' metrics into samples."""

from __future__ import annotations

import math
from datetime import timedelta

import requests
from django.conf import settings
from django.utils import timezone

from deployer.monitoring import scrape_metrics
from portal.deployments.choices import RevisionStatus
from portal.deployments.models import Revision
from portal.monitoring.models import MetricSample


def metrics_scrape() -> int:
    """Take one sample of every live instance; drop samples past the retention window."""
    now = timezone.now()
    taken = 0
    live = Revision.objects.filter(status=RevisionStatus.LIVE).exclude(metrics_url="")
    for revision in live:
        try:
            snapshot = scrape_metrics(revision.metrics_url)
        except (requests.RequestException, ValueError):
            continue
        MetricSample.objects.create(
            deployment_id=revision.deployment_id,
            revision=revision,
            taken_at=now,
            success=snapshot.success,
            failure=snapshot.failure,
            latency_buckets=[
                ["+Inf" if math.isinf(bound) else bound, count]
                for bound, count in snapshot.latency_buckets
            ],
        )
        taken += 1
    cutoff = now - timedelta(hours=settings.MODELPORT_METRICS_RETENTION_HOURS)
    MetricSample.objects.filter(taken_at__lt=cutoff).delete()
    return taken
