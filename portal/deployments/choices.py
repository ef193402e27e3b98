"""Status values for deployments and their revisions."""

from django.db import models


class DeploymentStatus(models.TextChoices):
    """What a deployment is doing; RUNNING, FAILED and STOPPED are final."""

    PENDING = "pending", "Pending"
    DEPLOYING = "deploying", "Deploying"
    RUNNING = "running", "Running"
    FAILED = "failed", "Failed"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"


FINAL_DEPLOYMENT_STATUSES = frozenset(
    {DeploymentStatus.RUNNING, DeploymentStatus.FAILED, DeploymentStatus.STOPPED}
)


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
