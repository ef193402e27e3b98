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
    # Replicas that answered the scrape at the interval's end.
    replicas: float = 0.0


def _buckets(raw: list[list[float | str]]) -> list[tuple[float, float]]:
    return [(math.inf if b == "+Inf" else float(b), float(c)) for b, c in raw]


def deployment_series(*, deployment: Deployment, minutes: int = 30) -> list[Point]:
    """Rates and quantiles per scrape interval over the last ``minutes``, over all replicas.

    Each interval adds up the replicas sampled at both of its ends; a replica whose
    counters went back (a new instance) or that missed a scrape adds nothing to it.
    """
    since = timezone.now() - timedelta(minutes=minutes)
    samples = MetricSample.objects.filter(deployment=deployment, taken_at__gte=since).order_by(
        "taken_at", "id"
    )
    scrapes = [
        (at, {(s.revision_id, s.replica_id): s for s in group})
        for at, group in itertools.groupby(samples, key=lambda s: s.taken_at)
    ]
    points: list[Point] = []
    for (start, before), (end, after) in itertools.pairwise(scrapes):
        seconds = (end - start).total_seconds()
        if seconds <= 0:
            continue
        done = failed = 0.0
        buckets: dict[float, float] = {}
        counted = False
        for key, last in after.items():
            first = before.get(key)
            if first is None or last.success < first.success or last.failure < first.failure:
                continue  # a replica that was not sampled at both ends, or restarted
            counted = True
            done += last.success - first.success
            failed += last.failure - first.failure
            for (bound, count), (_, prior) in zip(
                _buckets(last.latency_buckets), _buckets(first.latency_buckets), strict=False
            ):
                buckets[bound] = buckets.get(bound, 0.0) + count - prior
        if not counted:
            continue
        window = sorted(buckets.items())
        p50 = quantile(window, 0.5)
        p99 = quantile(window, 0.99)
        points.append(
            Point(
                at=end,
                requests_per_s=(done + failed) / seconds,
                errors_per_s=failed / seconds,
                p50_ms=p50 * 1000 if p50 is not None else None,
                p99_ms=p99 * 1000 if p99 is not None else None,
                replicas=float(len(after)),
            )
        )
    return points
