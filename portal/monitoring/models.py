"""Samples of each live instance's request counters, for the deployment page's charts."""

from __future__ import annotations

from django.db import models


class MetricSample(models.Model):
    """One replica's counters at one moment (counters restart with each instance); every
    replica of a live revision is sampled at the same ``taken_at``."""

    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="metric_samples"
    )
    revision = models.ForeignKey(
        "deployments.Revision", on_delete=models.CASCADE, related_name="metric_samples"
    )
    # Null: a revision's only instance, sampled before replicas had rows of their own.
    replica = models.ForeignKey(
        "deployments.Replica",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="metric_samples",
    )
    taken_at = models.DateTimeField(db_index=True)
    success = models.FloatField()
    failure = models.FloatField()
    # Cumulative latency histogram: [[upper bound in seconds, count], ...].
    latency_buckets = models.JSONField(default=list)

    class Meta:
        ordering = ["taken_at"]
        indexes = [models.Index(fields=["deployment", "taken_at"])]

    def __str__(self) -> str:
        return f"{self.deployment_id} @ {self.taken_at:%H:%M:%S}"
