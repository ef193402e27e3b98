"""Prometheus metrics on their own port, named after Triton's (nv_inference_*).

prometheus_client exposes counters with the `_total` suffix the Prometheus conventions ask
for, so Triton's `nv_inference_request_success` reads `nv_inference_request_success_total`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from deployer.serving.stats import Histogram, ModelStats

_LABELS = ["model", "version"]


def _histogram(name: str, doc: str, hist: Histogram, labels: list[str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=_LABELS)
    family.add_metric(labels, [(le, float(count)) for le, count in hist.cumulative()], hist.total)
    return family


class StatsCollector:
    """Reads ModelStats at scrape time; nothing is locked on the request path."""

    def __init__(self, stats: ModelStats, ready: Callable[[], bool], providers: list[str]) -> None:
        self.stats = stats
        self.ready = ready
        self.providers = providers

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        labels = [s.name, s.version]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(labels, value)
            return family

        yield counter(
            "nv_inference_request_success",
            "Number of successful inference requests, all batch sizes",
            s.success.count,
        )
        failure = CounterMetricFamily(
            "nv_inference_request_failure",
            "Number of failed inference requests, all batch sizes",
            labels=[*_LABELS, "reason"],
        )
        for reason in ("REJECTED", "BACKEND", "OTHER"):
            failure.add_metric([*labels, reason], s.failures_by_reason.get(reason, 0))
        yield failure
        yield counter(
            "nv_inference_count",
            "Number of inferences performed (rows; a batch of n counts n)",
            s.inference_count,
        )
        yield counter(
            "nv_inference_exec_count",
            "Number of model executions performed (batches)",
            s.execution_count,
        )
        yield counter(
            "nv_inference_request_duration_us",
            "Cumulative inference request duration in microseconds (including cached requests)",
            (s.success.ns + s.fail.ns) / 1000,
        )
        yield counter(
            "nv_inference_queue_duration_us",
            "Cumulative inference queuing duration in microseconds",
            s.queue.ns / 1000,
        )
        yield counter(
            "nv_inference_compute_input_duration_us",
            "Cumulative compute input duration in microseconds",
            s.compute_input.ns / 1000,
        )
        yield counter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative compute inference duration in microseconds",
            s.compute_infer.ns / 1000,
        )
        yield counter(
            "nv_inference_compute_output_duration_us",
            "Cumulative inference compute output duration in microseconds",
            s.compute_output.ns / 1000,
        )
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution",
            labels=_LABELS,
        )
        pending.add_metric(labels, s.pending_requests)
        yield pending
        yield _histogram(
            "modelport_request_duration_seconds",
            "Successful inference request duration, from body received to response ready",
            s.request_seconds,
            labels,
        )
        yield _histogram(
            "modelport_batch_size",
            "Rows per model execution formed by the dynamic batcher",
            s.batch_sizes,
            labels,
        )
        ready = GaugeMetricFamily(
            "modelport_model_ready", "1 when the model answers inference", labels=_LABELS
        )
        ready.add_metric(labels, 1.0 if self.ready() else 0.0)
        yield ready
        providers = GaugeMetricFamily(
            "modelport_execution_provider_info",
            "onnxruntime execution providers active for the model",
            labels=[*_LABELS, "provider"],
        )
        for provider in self.providers:
            providers.add_metric([*labels, provider], 1.0)
        yield providers


class MetricsServer:
    """prometheus_client's HTTP server in its own thread."""

    def __init__(self, collector: StatsCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving scrapes."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
