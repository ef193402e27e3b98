"""Turning counter samples into rates and latency quantiles over time."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from deployer.monitoring import quantile
from portal.deployments.models import Deployment
from portal.monitoring.models import MetricSample


@dataclass(frozen=True)
class Point:
    """One interval between two samples of the same instance."""

    at: datetime
    requests_per_s: float
    errors_per_s: float
    p50_ms: float | None
    p99_ms: float | None


def _buckets(raw: list[list[float | str]]) -> list[tuple[float, float]]:
    return [(math.inf if b == "+Inf" else float(b), float(c)) for b, c in raw]


def deployment_series(*, deployment: Deployment, minutes: int = 30) -> list[Point]:
    """Rates and quantiles per scrape interval over the last ``minutes``."""
    since = timezone.now() - timedelta(minutes=minutes)
    samples = list(
        MetricSample.objects.filter(deployment=deployment, taken_at__gte=since).order_by(
            "taken_at", "id"
        )
    )
    points: list[Point] = []
    for before, after in itertools.pairwise(samples):
        seconds = (after.taken_at - before.taken_at).total_seconds()
        if seconds <= 0 or before.revision_id != after.revision_id:
            continue  # counters restart with a new instance
        done = after.success - before.success
        failed = after.failure - before.failure
        if done < 0 or failed < 0:
            continue
        window = [
            (bound, count - prior)
            for (bound, count), (_, prior) in zip(
                _buckets(after.latency_buckets), _buckets(before.latency_buckets), strict=False
            )
        ]
        p50 = quantile(window, 0.5)
        p99 = quantile(window, 0.99)
        points.append(
            Point(
                at=after.taken_at,
                requests_per_s=(done + failed) / seconds,
                errors_per_s=failed / seconds,
                p50_ms=p50 * 1000 if p50 is not None else None,
                p99_ms=p99 * 1000 if p99 is not None else None,
            )
        )
    return points
