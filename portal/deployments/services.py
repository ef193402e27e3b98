"""Deploying, rolling back and stopping, and keeping runtimes and rows in agreement."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from deployer.checks import check_known_answer, wait_until_ready
from deployer.errors import DeployerError, TrackingError
from deployer.runtimes.base import InstanceState, LaunchSpec, Runtime
from deployer.tracking import set_alias
from portal.core import engine
from portal.core.api import ApiError, Conflict
from portal.core.choices import EventLevel
from portal.core.services import StepTimer, event_record
from portal.deployments.choices import (
    WORKING_REVISION_STATUSES,
    DeploymentStatus,
    Device,
    RevisionKind,
    RevisionStatus,
)
from portal.deployments.models import Deployment, Revision
from portal.registry.models import ModelVersion

if TYPE_CHECKING:
    from django.contrib.auth.models import User

log = logging.getLogger(__name__)


def gpu_unavailable_reason() -> str:
    """Why this installation cannot serve on a GPU, or "" when it can."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return "onnxruntime is not installed."
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            "This host has no GPU runtime: onnxruntime's CUDA execution provider is not "
            "available here (install onnxruntime-gpu on a host with an NVIDIA GPU and driver)."
        )
    return ""


# ---------------------------------------------------------------- requests


def deployment_deploy(
    *,
    version: ModelVersion,
    name: str,
    user: User,
    device: str = Device.CPU,
    cpus: Decimal | None = None,
    memory_mb: int | None = None,
) -> Revision:
    """Roll ``version`` out to the deployment ``name`` of its model (created on first use)."""
    if not version.is_ready:
        raise Conflict(
            f"Version {version.number} is {version.get_status_display().lower()}; it can be "
            "deployed once it is ready.",
            code="version_not_ready",
        )
    if device == Device.GPU and (reason := gpu_unavailable_reason()):
        raise ApiError(reason, code="gpu_unavailable")
    with transaction.atomic():
        deployment, created = Deployment.objects.select_for_update().get_or_create(
            model=version.model,
            name=name,
            defaults={
                "device": device,
                "created_by": user,
                "cpus": cpus or Decimal(1),
                "memory_mb": memory_mb or 1024,
            },
        )
        if not created:
            deployment.device = device
            if cpus is not None:
                deployment.cpus = cpus
            if memory_mb is not None:
                deployment.memory_mb = memory_mb
        return _start_revision(
            deployment=deployment, version=version, user=user, kind=RevisionKind.DEPLOY
        )


def deployment_rollback(
    *, deployment: Deployment, to_version: ModelVersion, user: User
) -> Revision:
    """Return the deployment to an earlier version (admins only; checked by the caller)."""
    if to_version.model_id != deployment.model_id:
        raise ApiError(f"Version {to_version.number} belongs to another model.", code="wrong_model")
    if not to_version.is_ready:
        raise Conflict(f"Version {to_version.number} is not ready.", code="version_not_ready")
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        current = locked.current_revision
        if (
            current is not None
            and current.version_id == to_version.pk
            and locked.status == (DeploymentStatus.RUNNING)
        ):
            raise Conflict(
                f"{locked.name} is already serving version {to_version.number}.",
                code="already_serving",
            )
        return _start_revision(
            deployment=locked, version=to_version, user=user, kind=RevisionKind.ROLLBACK
        )


def _start_revision(
    *, deployment: Deployment, version: ModelVersion, user: User | None, kind: str
) -> Revision:
    from portal.deployments.tasks import revision_rollout

    busy = deployment.revisions.filter(status__in=WORKING_REVISION_STATUSES).first()
    if busy is not None:
        raise Conflict(
            f"{deployment.name} is already rolling out version {busy.version.number}; wait "
            "until it finishes.",
            code="rollout_in_progress",
        )
    if deployment.status == DeploymentStatus.STOPPING:
        raise Conflict(f"{deployment.name} is stopping.", code="deployment_stopping")
    revision = Revision.objects.create(
        deployment=deployment,
        version=version,
        kind=kind,
        requested_by=user,
        runtime=engine.runtime().name,
    )
    deployment.status = DeploymentStatus.DEPLOYING
    deployment.error = ""
    deployment.save()
    verb = (
        "Rollback"
        if kind == RevisionKind.ROLLBACK
        else ("Restart" if kind == RevisionKind.RESTART else "Deploy")
    )
    event_record(
        team=deployment.model.team,
        actor=user,
        deployment=deployment,
        step=str(kind),
        level=EventLevel.WARNING if kind == RevisionKind.ROLLBACK else EventLevel.INFO,
        message=f"{verb} of version {version.number} to {deployment.name} requested "
        f"({deployment.device})",
        data={"revision": revision.pk, "version": version.number},
    )
    transaction.on_commit(partial(revision_rollout.delay, revision.pk))
    return revision


def deployment_stop(*, deployment: Deployment, user: User, delete: bool) -> None:
    """Stop serving; with ``delete`` the deployment is removed once stopped."""
    from portal.deployments.tasks import deployment_teardown

    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        locked.status = DeploymentStatus.STOPPING
        locked.save(update_fields=["status", "updated_at"])
        event_record(
            team=locked.model.team,
            actor=user,
            deployment=locked,
            step="stop",
            level=EventLevel.WARNING,
            message=f"{'Deletion' if delete else 'Stop'} of {locked.name} requested",
        )
        transaction.on_commit(partial(deployment_teardown.delay, locked.pk, delete))


# ---------------------------------------------------------------- task bodies


def revision_claim(*, revision_id: int) -> Revision | None:
    """Take a revision for rollout, counting the attempt; None if nothing is to do."""
    claimed = Revision.objects.filter(
        pk=revision_id,
        status__in=WORKING_REVISION_STATUSES,
        attempts__lt=settings.MODELPORT_TASK_MAX_ATTEMPTS,
    ).update(status=RevisionStatus.STARTING, attempts=F("attempts") + 1, updated_at=Now())
    revision = (
        Revision.objects.select_related("deployment__model__team", "version")
        .filter(pk=revision_id)
        .first()
    )
    if revision is None:
        return None
    if claimed:
        return revision
    if revision.status in WORKING_REVISION_STATUSES:
        _rollout_failed(
            revision,
            engine.runtime(),
            f"The rollout was interrupted {revision.attempts} times and was abandoned.",
        )
    return None


def revision_rollout(*, revision_id: int) -> None:
    """Start the revision's instance, prove it answers correctly, then switch to it.

    The previous revision keeps serving until the new one has passed its
    known-answer check; if the new one fails, the deployment says why and the old
    one stays live.
    """
    revision = revision_claim(revision_id=revision_id)
    if revision is None:
        return
    runtime = engine.runtime()
    deployment, version = revision.deployment, revision.version
    if revision.handle:
        # An earlier attempt died mid-rollout: its instance is not trusted, start afresh.
        runtime.stop(revision.handle, grace_s=1)
        revision.handle = ""
    served = version.served_model_path
    timer = StepTimer()
    try:
        if served is None:
            raise DeployerError(f"Version {version.number} has no served model file.")
        launch = runtime.start(
            LaunchSpec(
                deployment_id=deployment.pk,
                revision_id=revision.pk,
                model_name=deployment.model.name,
                model_version=str(version.number),
                model_path=served,
                image=version.image_ref,
                device=deployment.device,
                cpus=float(deployment.cpus),
                memory_mb=deployment.memory_mb,
                labels={
                    "modelport.deployment": str(deployment.pk),
                    "modelport.revision": str(revision.pk),
                },
            )
        )
        revision.handle, revision.internal_url = launch.handle, launch.url
        revision.metrics_url = launch.metrics_url
        revision.save(update_fields=["handle", "internal_url", "metrics_url", "updated_at"])
        event_record(
            team=deployment.model.team,
            deployment=deployment,
            step="start",
            message=f"Started {runtime.name} instance {launch.handle} for version {version.number}",
        )
        wait_until_ready(
            launch.url,
            deployment.model.name,
            timeout_s=settings.MODELPORT_READY_TIMEOUT_S,
            still_running=lambda: runtime.status(launch.handle).state == InstanceState.RUNNING,
            describe_failure=lambda: _log_tail(runtime, launch.handle),
        )
        check_known_answer(
            launch.url,
            deployment.model.name,
            version.known_answer_path,
            tolerance=engine.known_answer_tolerance(deployment.device),
        )
    except DeployerError as exc:
        _rollout_failed(revision, runtime, exc.message)
        return
    _switch(revision, runtime, ready_seconds=timer.ms / 1000, url=launch.url)


def _switch(revision: Revision, runtime: Runtime, *, ready_seconds: float, url: str) -> None:
    deployment, version = revision.deployment, revision.version
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        previous = locked.current_revision
        revision.mark_live(ready_seconds=ready_seconds)
        locked.mark_running(revision=revision, endpoint_url=f"{url}/v2/models/{locked.model.name}")
        if previous is not None and previous.pk != revision.pk:
            previous.mark_ended(status=RevisionStatus.SUPERSEDED)
        event_record(
            team=locked.model.team,
            deployment=locked,
            step="live",
            level=EventLevel.SUCCESS,
            message=f"Version {version.number} is live on {locked.name} "
            f"(ready and known answer correct in {ready_seconds:.1f} s)",
            duration_ms=int(ready_seconds * 1000),
        )
    if previous is not None and previous.pk != revision.pk and previous.handle:
        runtime.stop(previous.handle, grace_s=10)
    _move_alias(locked, version)


def _move_alias(deployment: Deployment, version: ModelVersion) -> None:
    """Point the MLflow alias named after the deployment (e.g. production) at the version."""
    alias = deployment.name
    if not version.mlflow_version:
        return
    try:
        set_alias(
            engine.tracking_target(),
            deployment.model.mlflow_name,
            alias,
            version.mlflow_version,
        )
    except TrackingError as exc:
        event_record(
            team=deployment.model.team,
            deployment=deployment,
            step="alias",
            level=EventLevel.WARNING,
            message=f"The MLflow alias {alias!r} was not moved: {exc.message}",
        )
        return
    event_record(
        team=deployment.model.team,
        deployment=deployment,
        step="alias",
        message=f"MLflow alias {alias!r} now points at version {version.mlflow_version}",
    )


def _rollout_failed(revision: Revision, runtime: Runtime, message: str) -> None:
    if revision.handle:
        runtime.stop(revision.handle, grace_s=1)
    deployment = revision.deployment
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        revision.mark_failed(message=message)
        keeps = locked.current_revision
        locked.mark_failed(
            message=f"Version {revision.version.number} did not go live: {message}"
            + (f" Version {keeps.version.number} keeps serving." if keeps else "")
        )
        event_record(
            team=locked.model.team,
            deployment=locked,
            step="rollout",
            level=EventLevel.ERROR,
            message=locked.error,
        )


def _log_tail(runtime: Runtime, handle: str) -> str:
    tail = runtime.logs(handle, tail=15).strip()
    return f"Last log lines:\n{tail}" if tail else "It wrote no log."


def deployment_teardown(*, deployment_id: int, delete: bool) -> None:
    """Stop every instance of a deployment; delete the row too when asked."""
    deployment = Deployment.objects.select_related("model__team").filter(pk=deployment_id).first()
    if deployment is None:
        return
    runtime = engine.runtime()
    for revision in deployment.revisions.exclude(handle=""):
        runtime.stop(revision.handle, grace_s=10)
    for instance in runtime.owned():
        if instance.deployment_id == deployment.pk:
            runtime.stop(instance.handle, grace_s=1)
    with transaction.atomic():
        for revision in deployment.revisions.filter(
            status__in=[RevisionStatus.LIVE, *WORKING_REVISION_STATUSES]
        ):
            revision.mark_ended(status=RevisionStatus.STOPPED)
        if delete:
            event_record(
                team=deployment.model.team,
                model=deployment.model,
                step="stop",
                level=EventLevel.WARNING,
                message=f"Deployment {deployment.name} stopped and deleted",
            )
            deployment.delete()
            return
        Deployment.objects.filter(pk=deployment.pk).update(
            status=DeploymentStatus.STOPPED,
            current_revision=None,
            endpoint_url="",
            updated_at=Now(),
        )
        event_record(
            team=deployment.model.team,
            deployment=deployment,
            step="stop",
            message=f"Deployment {deployment.name} stopped",
        )


def deployments_reconcile() -> dict[str, int]:
    """Compare deployments with the instances the runtime owns and repair the difference.

    Dead live instances are restarted through a new revision, instances nobody
    wants are stopped, and rollouts or stops that lost their worker are handed
    back to one (or ended, when out of attempts).
    """
    from portal.deployments.tasks import deployment_teardown as teardown_task
    from portal.deployments.tasks import revision_rollout as rollout_task

    runtime = engine.runtime()
    counts = {"restarted": 0, "orphans_stopped": 0, "requeued": 0, "failed": 0}
    stale = timezone.now() - timedelta(seconds=settings.MODELPORT_STALE_AFTER_S)
    lost = timezone.now() - timedelta(seconds=60)

    wanted: set[str] = set()
    for revision in Revision.objects.filter(
        status__in=[RevisionStatus.LIVE, *WORKING_REVISION_STATUSES]
    ).exclude(handle=""):
        wanted.add(revision.handle)
    for instance in runtime.owned():
        if instance.handle not in wanted:
            runtime.stop(instance.handle, grace_s=5)
            counts["orphans_stopped"] += 1

    for deployment in Deployment.objects.filter(status=DeploymentStatus.RUNNING).select_related(
        "current_revision__version", "model__team"
    ):
        current = deployment.current_revision
        if current is None or not current.handle:
            continue
        if runtime.status(current.handle).state == InstanceState.RUNNING:
            continue
        if deployment.revisions.filter(status__in=WORKING_REVISION_STATUSES).exists():
            continue
        with transaction.atomic():
            event_record(
                team=deployment.model.team,
                deployment=deployment,
                step="reconcile",
                level=EventLevel.WARNING,
                message=f"The instance of version {current.version.number} is gone; restarting it",
            )
            _start_revision(
                deployment=deployment,
                version=current.version,
                user=None,
                kind=RevisionKind.RESTART,
            )
        counts["restarted"] += 1

    for revision in Revision.objects.filter(
        status__in=WORKING_REVISION_STATUSES, updated_at__lt=lost
    ).select_related("deployment__model__team", "version"):
        age_limit = stale if revision.status == RevisionStatus.STARTING else lost
        if revision.updated_at >= age_limit:
            continue
        if revision.attempts >= settings.MODELPORT_TASK_MAX_ATTEMPTS:
            _rollout_failed(revision, runtime, "No worker finished the rollout.")
            counts["failed"] += 1
        else:
            Revision.objects.filter(pk=revision.pk).update(updated_at=Now())
            rollout_task.delay(revision.pk)
            counts["requeued"] += 1

    for deployment in Deployment.objects.filter(
        status=DeploymentStatus.STOPPING, updated_at__lt=lost
    ):
        Deployment.objects.filter(pk=deployment.pk).update(updated_at=Now())
        teardown_task.delay(deployment.pk, False)
        counts["requeued"] += 1
    return counts
