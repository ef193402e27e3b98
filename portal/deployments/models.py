"""Deployments and the revisions each one has run."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from portal.accounts.models import Team
from portal.deployments.choices import (
    ACTIVE_REPLICA_STATES,
    FINAL_DEPLOYMENT_STATUSES,
    DeploymentStatus,
    Device,
    ReplicaState,
    RevisionKind,
    RevisionStatus,
)
from portal.registry.models import Model, ModelVersion, name_validator

# Most replicas one deployment may ask for.
MAX_REPLICAS = 16


class Deployment(models.Model):
    """A named, long-lived endpoint for one model (for example ``production``)."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="deployments")
    name = models.CharField(max_length=63, validators=[name_validator])
    status = models.CharField(
        max_length=16, choices=DeploymentStatus.choices, default=DeploymentStatus.PENDING
    )
    device = models.CharField(max_length=8, choices=Device.choices, default=Device.CPU)
    cpus = models.DecimalField(max_digits=5, decimal_places=2, default=1)
    memory_mb = models.PositiveIntegerField(default=1024)
    # Most processes (and threads) a container of this deployment may run.
    pids_limit = models.PositiveIntegerField(default=256)
    current_revision = models.ForeignKey(
        "Revision", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    endpoint_url = models.URLField(max_length=500, blank=True)
    # Where gRPC clients reach it (host:port): the stable one, or the instance's own.
    grpc_address = models.CharField(max_length=255, blank=True)
    # Private by default: a call needs an inference key. Team admins may open it.
    public = models.BooleanField(default=False)
    # How many instances of the live revision serve it (each readiness-gated). The
    # deployment runs min_replicas; max_replicas bounds what autoscaling may add.
    min_replicas = models.PositiveSmallIntegerField(default=1)
    max_replicas = models.PositiveSmallIntegerField(default=1)
    # Autoscaling (on when a target is set and max_replicas > min_replicas): about this
    # many requests in flight per replica, no scale-down within the cooldown of a change.
    # replica_target is what the autoscaler chose last (0: nothing chosen yet).
    autoscale_target_inflight = models.FloatField(null=True, blank=True)
    autoscale_cooldown_s = models.PositiveIntegerField(default=60)
    replica_target = models.PositiveSmallIntegerField(default=0)
    scaled_at = models.DateTimeField(null=True, blank=True)
    # With device "gpu": how many GPUs each replica gets, or exactly which (comma-separated
    # device ids; then the count is their number). Replicas are spread over free GPUs.
    gpu_count = models.PositiveSmallIntegerField(default=1)
    gpu_ids = models.CharField(max_length=400, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["model", "name"], name="deployment_unique_name"),
            models.CheckConstraint(
                condition=models.Q(min_replicas__gte=1)
                & models.Q(max_replicas__gte=models.F("min_replicas"))
                & models.Q(max_replicas__lte=MAX_REPLICAS),
                name="deployment_replicas_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model.name}/{self.name}"

    @property
    def autoscaling(self) -> bool:
        return self.autoscale_target_inflight is not None and self.max_replicas > self.min_replicas

    @property
    def replicas_wanted(self) -> int:
        """How many replicas run now: min_replicas, or the autoscaler's choice within
        min..max when autoscaling is on."""
        if not self.autoscaling or not self.replica_target:
            return self.min_replicas
        return min(max(self.replica_target, self.min_replicas), self.max_replicas)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_DEPLOYMENT_STATUSES

    @property
    def team(self) -> Team:
        return self.model.team

    def mark_running(
        self, *, revision: Revision, endpoint_url: str, grpc_address: str = ""
    ) -> None:
        """Point the deployment at a revision that answered its known-answer check."""
        self.status, self.current_revision, self.endpoint_url = (
            DeploymentStatus.RUNNING,
            revision,
            endpoint_url,
        )
        self.grpc_address = grpc_address
        self.error = ""
        self.save(
            update_fields=[
                "status", "current_revision", "endpoint_url", "grpc_address", "error",
                "updated_at",
            ]
        )  # fmt: skip

    def mark_failed(self, *, message: str) -> None:
        """Record why a rollout failed; a revision still live keeps serving."""
        keeps = (
            DeploymentStatus.DEGRADED
            if self.status == DeploymentStatus.DEGRADED
            else DeploymentStatus.RUNNING
        )
        self.status = keeps if self.current_revision_id else DeploymentStatus.FAILED
        self.error = message
        self.save(update_fields=["status", "error", "current_revision", "updated_at"])


class Revision(models.Model):
    """One version a deployment ran (or tried to), from when to when, and who asked."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="revisions")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="revisions")
    kind = models.CharField(
        max_length=16, choices=RevisionKind.choices, default=RevisionKind.DEPLOY
    )
    status = models.CharField(
        max_length=16, choices=RevisionStatus.choices, default=RevisionStatus.PENDING
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    runtime = models.CharField(max_length=16, blank=True)
    # The runtime's own handle for what it started (process id, container id).
    handle = models.CharField(max_length=128, blank=True)
    internal_url = models.CharField(max_length=255, blank=True)
    internal_grpc = models.CharField(max_length=255, blank=True)
    # Where the instance's Prometheus metrics are scraped (the monitoring app reads it).
    metrics_url = models.CharField(max_length=255, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    live_from = models.DateTimeField(null=True, blank=True)
    live_until = models.DateTimeField(null=True, blank=True)
    ready_seconds = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "updated_at"])]

    def __str__(self) -> str:
        return f"{self.deployment} → v{self.version.number} ({self.status})"

    def mark_live(self, *, ready_seconds: float) -> None:
        self.status, self.live_from, self.ready_seconds = (
            RevisionStatus.LIVE,
            timezone.now(),
            ready_seconds,
        )
        self.error = ""
        self.save(update_fields=["status", "live_from", "ready_seconds", "error", "updated_at"])

    def mark_ended(self, *, status: str) -> None:
        """End a live revision: superseded by another, or stopped."""
        self.status, self.live_until = status, timezone.now()
        self.save(update_fields=["status", "live_until", "updated_at"])

    def mark_failed(self, *, message: str) -> None:
        self.status, self.error = RevisionStatus.FAILED, message
        self.live_until = self.live_until or (timezone.now() if self.live_from else None)
        self.save(update_fields=["status", "error", "live_until", "updated_at"])


class AsyncCallbackSecret(models.Model):
    """The secret a team's async callbacks are signed with (HMAC-SHA256; README "Async")."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, related_name="+")
    secret = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"callback secret of {self.team}"


class Replica(models.Model):
    """One instance of a revision, in one of the deployment's replica slots."""

    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="replicas")
    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="replicas")
    # 0..min_replicas-1; a replacement takes the slot of the replica it replaces.
    slot = models.PositiveSmallIntegerField()
    state = models.CharField(
        max_length=16, choices=ReplicaState.choices, default=ReplicaState.STARTING
    )
    runtime = models.CharField(max_length=16, blank=True)
    handle = models.CharField(max_length=128, blank=True)
    internal_url = models.CharField(max_length=255, blank=True)
    internal_grpc = models.CharField(max_length=255, blank=True)
    metrics_url = models.CharField(max_length=255, blank=True)
    # Mean requests in flight over the last scrape interval (Little's law; autoscaling).
    inflight = models.FloatField(null=True, blank=True)
    # The GPUs (device ids, comma-separated) the runtime placed it on; empty on the CPU.
    gpus = models.CharField(max_length=400, blank=True)
    # How many replicas of this slot ended before this one (0: the first).
    restarts = models.PositiveIntegerField(default=0)
    # Why it ended ("killed by signal SIGKILL", "exited with code 3", OOM, readiness).
    cause = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # Its own traffic, from the last two scrapes of its metrics port.
    rate_per_s = models.FloatField(null=True, blank=True)
    p99_ms = models.FloatField(null=True, blank=True)
    metrics_at = models.DateTimeField(null=True, blank=True)
    metrics_last = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slot", "-created_at"]
        constraints = [
            # One working replica per slot: two healers racing cannot both start one.
            models.UniqueConstraint(
                fields=["revision", "slot"],
                condition=models.Q(state__in=sorted(ACTIVE_REPLICA_STATES)),
                name="replica_one_active_per_slot",
            ),
        ]
        indexes = [models.Index(fields=["deployment", "state"])]

    def __str__(self) -> str:
        return f"{self.revision} #{self.slot} ({self.state})"


# Batch jobs live in their own module of this app (one migration, one admin).
from portal.deployments.batch.models import BatchJob  # noqa: E402

__all__ = ["AsyncCallbackSecret", "BatchJob", "Deployment", "Replica", "Revision"]
