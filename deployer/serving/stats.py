"""Request and batch counters, kept on the event loop and read by /stats and Prometheus."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

# Histogram bucket upper bounds, in seconds, for request durations.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Duration:
    """A count and a total in nanoseconds, as Triton's statistics report them."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Histogram:
    """A cumulative-bucket histogram (Prometheus semantics) with a running sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound, bucket in zip(self.bounds, self.counts, strict=False):
            running += bucket
            pairs.append((_format_bound(bound), running))
        pairs.append(("+Inf", self.count))
        return pairs


def _format_bound(value: float) -> str:
    return repr(float(value))


@dataclass
class BatchStat:
    """Timing of the batches of one size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """Everything counted for the served model."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.failures_by_reason: dict[str, int] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStat] = {}
        self.request_seconds = Histogram(DURATION_BUCKETS)
        self.batch_sizes = Histogram(tuple(float(b) for b in BATCH_BUCKETS))
        self.inflight_requests = 0
        self.pending_requests = 0

    def record_success(self, duration_ns: int) -> None:
        self.success.add(duration_ns)
        self.request_seconds.observe(duration_ns / 1e9)

    def record_failure(self, duration_ns: int, reason: str) -> None:
        self.fail.add(duration_ns)
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1

    def record_batch(
        self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(input_ns, requests)
        self.compute_infer.add(infer_ns, requests)
        self.compute_output.add(output_ns, requests)
        self.batch_sizes.observe(float(rows))
        stat = self.batches.get(rows)
        if stat is None:
            stat = self.batches[rows] = BatchStat()
        stat.compute_input.add(input_ns)
        stat.compute_infer.add(infer_ns)
        stat.compute_output.add(output_ns)

    def as_triton(self) -> dict[str, Any]:
        """The statistics extension's answer for this model, in Triton's JSON form."""
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": stat.compute_input.as_dict(),
                    "compute_infer": stat.compute_infer.as_dict(),
                    "compute_output": stat.compute_output.as_dict(),
                }
                for size, stat in sorted(self.batches.items())
            ],
        }
