"""Status values for deployments and their revisions."""

from django.db import models


class DeploymentStatus(models.TextChoices):
    """What a deployment is doing; RUNNING, FAILED and STOPPED are final."""

    PENDING = "pending", "Pending"
    DEPLOYING = "deploying", "Deploying"
    RUNNING = "running", "Running"
    # Serving, but with fewer ready replicas than it should have (some keep crashing).
    DEGRADED = "degraded", "Degraded"
    FAILED = "failed", "Failed"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"


FINAL_DEPLOYMENT_STATUSES = frozenset(
    {
        DeploymentStatus.RUNNING,
        DeploymentStatus.DEGRADED,
        DeploymentStatus.FAILED,
        DeploymentStatus.STOPPED,
    }
)
# A live revision serves in these (a degraded one with fewer replicas than asked for).
SERVING_DEPLOYMENT_STATUSES = frozenset({DeploymentStatus.RUNNING, DeploymentStatus.DEGRADED})


class RevisionStatus(models.TextChoices):
    """A revision's outcome: LIVE while serving, then SUPERSEDED or STOPPED."""

    PENDING = "pending", "Pending"
    STARTING = "starting", "Starting"
    LIVE = "live", "Live"
    SUPERSEDED = "superseded", "Superseded"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed"


FINAL_REVISION_STATUSES = frozenset(
    {RevisionStatus.SUPERSEDED, RevisionStatus.STOPPED, RevisionStatus.FAILED}
)
WORKING_REVISION_STATUSES = frozenset({RevisionStatus.PENDING, RevisionStatus.STARTING})


class RevisionKind(models.TextChoices):
    DEPLOY = "deploy", "Deploy"
    ROLLBACK = "rollback", "Rollback"
    RESTART = "restart", "Restart"


class Device(models.TextChoices):
    CPU = "cpu", "CPU"
    GPU = "gpu", "GPU"


class BatchJobStatus(models.TextChoices):
    """A batch job's state; SUCCEEDED, FAILED and CANCELLED are final."""

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINAL_BATCH_STATUSES = frozenset(
    {BatchJobStatus.SUCCEEDED, BatchJobStatus.FAILED, BatchJobStatus.CANCELLED}
)


class ReplicaState(models.TextChoices):
    """One instance of a revision: STARTING until it passed readiness and the known
    answer, READY while it gets traffic, then FAILED (it died or stopped answering) or
    STOPPED (on purpose)."""

    STARTING = "starting", "Starting"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"
    STOPPED = "stopped", "Stopped"


ACTIVE_REPLICA_STATES = frozenset({ReplicaState.STARTING, ReplicaState.READY})
