"""Scraping live instances' metrics into samples."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import requests
from django.conf import settings
from django.utils import timezone

from deployer.monitoring import scrape_metrics
from portal.deployments.choices import ACTIVE_REPLICA_STATES, RevisionStatus
from portal.deployments.models import Replica, Revision
from portal.monitoring.models import MetricSample


def _targets(revision: Revision) -> list[tuple[Replica | None, str]]:
    """The revision's serving replicas and their metrics URLs (its own, before replicas)."""
    replicas = revision.replicas.filter(state__in=sorted(ACTIVE_REPLICA_STATES)).exclude(
        metrics_url=""
    )
    found: list[tuple[Replica | None, str]] = [(r, r.metrics_url) for r in replicas]
    if not found and revision.metrics_url:
        found.append((None, revision.metrics_url))
    return found


def metrics_scrape() -> int:
    """Take one sample of every replica of every live revision, all at one ``taken_at``
    (the charts add them up); drop samples past the retention window."""
    now = timezone.now()
    taken = 0
    for revision in Revision.objects.filter(status=RevisionStatus.LIVE):
        for replica, url in _targets(revision):
            taken += _sample(revision, replica, url, now)
    cutoff = now - timedelta(hours=settings.MODELPORT_METRICS_RETENTION_HOURS)
    MetricSample.objects.filter(taken_at__lt=cutoff).delete()
    return taken


def _sample(revision: Revision, replica: Replica | None, url: str, now: datetime) -> int:
    """One instance's counters as a sample (0: it did not answer; the interval skips it)."""
    try:
        snapshot = scrape_metrics(url)
    except (requests.RequestException, ValueError):
        return 0
    MetricSample.objects.create(
        deployment_id=revision.deployment_id,
        revision=revision,
        replica=replica,
        taken_at=now,
        success=snapshot.success,
        failure=snapshot.failure,
        latency_buckets=[
            ["+Inf" if math.isinf(bound) else bound, count]
            for bound, count in snapshot.latency_buckets
        ],
    )
    return 1
