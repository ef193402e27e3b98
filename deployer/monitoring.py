"""Read a serving instance's Prometheus metrics into a small snapshot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families

LATENCY_METRIC = "modelport_request_duration_seconds"


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counters at one moment: requests, failures and the latency histogram."""

    success: float
    failure: float
    latency_buckets: list[tuple[float, float]] = field(default_factory=list)
    latency_sum: float = 0.0


def parse_metrics(text: str) -> MetricsSnapshot:
    """Pick the counters the portal charts out of a Prometheus text exposition."""
    success = failure = latency_sum = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nv_inference_request_success_total":
                success += sample.value
            elif sample.name == "nv_inference_request_failure_total":
                failure += sample.value
            elif sample.name == f"{LATENCY_METRIC}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == f"{LATENCY_METRIC}_sum":
                latency_sum += sample.value
    return MetricsSnapshot(
        success=success,
        failure=failure,
        latency_buckets=sorted(buckets.items()),
        latency_sum=latency_sum,
    )


def scrape_metrics(url: str, *, timeout_s: float = 2.0) -> MetricsSnapshot:
    """Fetch and parse ``url`` (raises ``requests.RequestException`` when unreachable)."""
    response = requests.get(url, timeout=timeout_s)
    response.raise_for_status()
    return parse_metrics(response.text)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of cumulative histogram ``buckets`` (upper bound, count), by linear
    interpolation inside the bucket, as Prometheus' histogram_quantile does; None if empty."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
