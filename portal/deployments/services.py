"""Deploying, rolling back and stopping, and keeping runtimes and rows in agreement."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Now
from django.utils import timezone

from deployer.errors import DeployerError, LaunchError, TrackingError
from deployer.images.build import image_get
from deployer.proxy import ProxyError, Route
from deployer.runtimes.base import (
    HandsOverAddress,
    InstanceState,
    LaunchResult,
    Runtime,
)
from deployer.runtimes.docker import DockerRuntime
from deployer.runtimes.gpus import GpuPlacementError, GpuRequest
from deployer.tracking import set_alias
from portal.core import engine
from portal.core.api import ApiError, Conflict
from portal.core.choices import EventLevel
from portal.core.services import StepTimer, event_record
from portal.deployments.async_inference import deployment_spool_remove
from portal.deployments.choices import (
    ACTIVE_REPLICA_STATES,
    SERVING_DEPLOYMENT_STATUSES,
    WORKING_REVISION_STATUSES,
    DeploymentStatus,
    Device,
    ReplicaState,
    RevisionKind,
    RevisionStatus,
)
from portal.deployments.inference_keys import (
    all_keys_write,
    deployment_keys_remove,
    deployment_keys_write,
    keys_last_used_record,
)
from portal.deployments.models import Deployment, Replica, Revision
from portal.deployments.replicas import (
    Started,
    replica_exited,
    replica_mark_ready,
    replica_prove,
    replica_start,
    replicas_check,
    replicas_stop,
    route_for,
)
from portal.registry.models import ModelVersion

if TYPE_CHECKING:
    from django.contrib.auth.models import User

log = logging.getLogger(__name__)


def gpu_unavailable_reason() -> str:
    """Why this installation cannot serve on a GPU, or "" when it can (or cannot tell yet).

    Safe in the web process: for containers it reads what the deploy worker last
    found out about the engine (it checks again before anything is built or started).
    """
    if engine.builds_images():
        facts = engine.engine_facts()
        if facts.get("runtime") == "docker":
            return str(facts.get("gpu_reason", ""))
        if settings.MODELPORT_RUNTIME == "docker" or not facts:
            return ""
    return _local_gpu_reason()


def _local_gpu_reason() -> str:
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
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    gpu_count: int | None = None,
    gpu_ids: str | None = None,
) -> Revision:
    """Roll ``version`` out to the deployment ``name`` of its model (created on first use),
    with ``min_replicas`` instances (kept from before when not given; 1 at first). On the
    GPU each replica gets ``gpu_count`` GPUs or exactly ``gpu_ids`` (kept when not given)."""
    if not version.is_ready:
        raise Conflict(
            f"Version {version.number} is {version.get_status_display().lower()}; it can be "
            "deployed once it is ready.",
            code="version_not_ready",
        )
    if device == Device.GPU and (reason := gpu_unavailable_reason()):
        raise ApiError(reason, code="gpu_unavailable")
    if gpu_count is not None or gpu_ids is not None:
        try:
            request = GpuRequest.parse(gpu_count or 1, gpu_ids or "")
        except GpuPlacementError as exc:
            raise ApiError(exc.message, code="gpu_request_invalid") from exc
        gpu_count, gpu_ids = request.wanted, ",".join(request.device_ids)
    if min_replicas is not None and max_replicas is None:
        max_replicas = max(min_replicas, 1)
    if min_replicas is not None or max_replicas is not None:
        replicas_check(min_replicas or 1, max_replicas or 1)
    with transaction.atomic():
        deployment, created = Deployment.objects.select_for_update().get_or_create(
            model=version.model,
            name=name,
            defaults={
                "device": device,
                "created_by": user,
                "cpus": cpus or Decimal(1),
                "memory_mb": memory_mb or 1024,
                "pids_limit": settings.MODELPORT_CONTAINER_PIDS_LIMIT,
                "min_replicas": min_replicas or 1,
                "max_replicas": max_replicas or 1,
                "gpu_count": gpu_count or 1,
                "gpu_ids": gpu_ids or "",
            },
        )
        if not created:
            deployment.device = device
            if cpus is not None:
                deployment.cpus = cpus
            if memory_mb is not None:
                deployment.memory_mb = memory_mb
            if min_replicas is not None:
                deployment.min_replicas = min_replicas
            if max_replicas is not None:
                deployment.max_replicas = max_replicas
            if gpu_count is not None:
                deployment.gpu_count, deployment.gpu_ids = gpu_count, gpu_ids or ""
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
            and locked.status in SERVING_DEPLOYMENT_STATUSES
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
    # The deploy worker records the runtime when it starts the instance: the web
    # process never asks the engine anything.
    revision = Revision.objects.create(
        deployment=deployment, version=version, kind=kind, requested_by=user
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


def deployment_public_set(*, deployment: Deployment, public: bool, user: User) -> bool:
    """Open a deployment to calls without a key, or make it private again (team admins;
    checked by the caller). On the timeline; instances follow within a second."""
    with transaction.atomic():
        changed = (
            Deployment.objects.filter(pk=deployment.pk)
            .exclude(public=public)
            .update(public=public, updated_at=Now())
        )
        deployment.public = public
        if changed:
            event_record(
                team=deployment.model.team,
                actor=user,
                deployment=deployment,
                step="access",
                level=EventLevel.WARNING if public else EventLevel.INFO,
                message=f"{deployment.name} made public: calls need no key"
                if public
                else f"{deployment.name} made private: calls need an inference key",
            )
    deployment_keys_write(deployment=deployment)
    return bool(changed)


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
            _runtime_of(revision),
            f"The rollout was interrupted {revision.attempts} times and was abandoned.",
        )
    return None


def _runtime_of(revision: Revision) -> Runtime:
    """The runtime that started a revision's instance (the current one if none yet)."""
    return engine.runtime_named(revision.runtime) if revision.runtime else engine.runtime()


def revision_rollout(*, revision_id: int) -> None:
    """Start the revision's instance, prove it answers correctly, then switch to it.

    The previous revision keeps serving until the new one has passed its
    known-answer check and the proxy routes to it; if the new one fails, the
    deployment says why and the old one stays live.
    """
    revision = revision_claim(revision_id=revision_id)
    if revision is None:
        return
    deployment, version = revision.deployment, revision.version
    _discard_earlier_attempt(revision)
    runtime = engine.runtime()
    revision.runtime = runtime.name
    revision.save(update_fields=["runtime", "updated_at"])
    served = version.served_model_path
    timer = StepTimer()
    count = deployment.replicas_wanted
    started: list[Started] = []
    try:
        if served is None:
            raise DeployerError(f"Version {version.number} has no served model file.")
        _preflight(deployment, runtime)
        image = _image_for(revision, runtime)
        # Every replica starts at once; each is proven on its own before any gets traffic.
        for slot in range(count):
            started.append(
                replica_start(revision=revision, runtime=runtime, slot=slot, image=image)
            )
            if slot == 0:
                first = started[0].launch
                revision.handle, revision.internal_url = first.handle, first.url
                revision.internal_grpc, revision.metrics_url = (
                    first.grpc_address,
                    first.metrics_url,
                )
                revision.save(
                    update_fields=[
                        "handle", "internal_url", "internal_grpc", "metrics_url", "updated_at",
                    ]
                )  # fmt: skip
        handles = ", ".join(s.launch.handle[:12] for s in started)
        event_record(
            team=deployment.model.team,
            deployment=deployment,
            step="start",
            message=f"Started {count} {runtime.name} instance{'s' if count > 1 else ''} "
            f"({handles}) for version {version.number}" + (f" from {image}" if image else ""),
        )
        for one in started:
            replica_prove(started=one, runtime=runtime)
            if not replica_mark_ready(one.replica):
                raise LaunchError(
                    f"Replica {one.replica.slot + 1} stopped before it got traffic: "
                    f"{Replica.objects.get(pk=one.replica.pk).cause}"
                )
    except (DeployerError, IntegrityError) as exc:
        message = exc.message if isinstance(exc, DeployerError) else "Its replicas were taken."
        _rollout_failed(revision, runtime, message)
        return
    _switch(revision, runtime, ready_seconds=timer.ms / 1000, launch=started[0].launch)


def _discard_earlier_attempt(revision: Revision) -> None:
    """Remove what an interrupted attempt of this revision left: its instance is not trusted.

    By handle when it was saved, and by label for an instance started just before
    the worker died (its handle never reached the row).
    """
    replicas_stop(revision=revision, grace_s=1, cause="an interrupted rollout left it")
    if revision.handle:
        _runtime_of(revision).stop(revision.handle, grace_s=1)
    for runtime in engine.runtimes_in_use():
        for instance in runtime.owned():
            if instance.revision_id == revision.pk:
                runtime.stop(instance.handle, grace_s=1)
    if revision.handle:
        revision.handle = revision.internal_url = revision.metrics_url = ""
        revision.internal_grpc = ""
        revision.save(
            update_fields=["handle", "internal_url", "internal_grpc", "metrics_url", "updated_at"]
        )


def _preflight(deployment: Deployment, runtime: Runtime) -> None:
    """Refuse a GPU deployment plainly, before anything is built or started, without GPUs."""
    if deployment.device != Device.GPU:
        return
    if isinstance(runtime, DockerRuntime):
        reason = runtime.gpu_unavailable_reason()
        engine.engine_facts_record(runtime="docker", gpu_reason=reason)
    else:
        reason = _local_gpu_reason()
    if reason:
        raise LaunchError(reason, code="gpu_unavailable")


def _image_for(revision: Revision, runtime: Runtime) -> str:
    """The model image to run (containers only): built by the pipeline, or now for a GPU.

    A rollback finds the earlier version's image by its content tag and builds nothing.
    """
    if not isinstance(runtime, DockerRuntime):
        return ""
    from portal.registry.services import version_image_ensure

    version, device = revision.version, revision.deployment.device
    known = version.image_ref if device == Device.CPU else ""
    known = known or str(version.report.get("images", {}).get(device, ""))
    if known and image_get(runtime.client, known) is not None:
        return known

    def touch(_line: str) -> None:
        Revision.objects.filter(pk=revision.pk).update(updated_at=Now())

    return version_image_ensure(version=version, device=device, on_line=touch).ref


def _route_for(deployment: Deployment, revision: Revision) -> Route:
    return route_for(deployment, revision)


def _switch(
    revision: Revision, runtime: Runtime, *, ready_seconds: float, launch: LaunchResult
) -> None:
    deployment, version = revision.deployment, revision.version
    proxy = engine.proxy()
    switch_note = ""
    endpoint = f"{launch.url}/v2/models/{deployment.model.name}"
    grpc_address = revision.internal_grpc
    if proxy is None and launch.public_url and isinstance(runtime, HandsOverAddress):
        # No proxy: every replica takes over the deployment's own listening sockets.
        try:
            for replica in revision.replicas.filter(state=ReplicaState.READY):
                runtime.take_over(replica.handle)
        except LaunchError as exc:
            _rollout_failed(revision, runtime, exc.message)
            return
        endpoint = f"{launch.public_url}/v2/models/{deployment.model.name}"
        grpc_address = launch.public_grpc or grpc_address
        switch_note = "; took over the stable address"
    if proxy is not None:
        route = _route_for(deployment, revision)
        try:
            proxy.ensure_running()
            switched = proxy.set_route(route)
        except ProxyError as exc:
            _rollout_failed(revision, runtime, f"The proxy did not take the new route: {exc}")
            return
        endpoint = f"{proxy.url(route.prefix)}v2/models/{deployment.model.name}"
        grpc_address = proxy.grpc_address(route) or grpc_address
        switch_note = f"; route switched in {switched * 1000:.0f} ms"
    # The alias moves before the deployment reads running at this version, so whoever
    # sees "running, version N" finds the alias at N too.
    _move_alias(deployment, version)
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        previous = locked.current_revision
        revision.mark_live(ready_seconds=ready_seconds)
        locked.mark_running(revision=revision, endpoint_url=endpoint, grpc_address=grpc_address)
        if previous is not None and previous.pk != revision.pk:
            previous.mark_ended(status=RevisionStatus.SUPERSEDED)
        event_record(
            team=locked.model.team,
            deployment=locked,
            step="live",
            level=EventLevel.SUCCESS,
            message=f"Version {version.number} is live on {locked.name} "
            f"(ready and known answer correct in {ready_seconds:.1f} s{switch_note})",
            duration_ms=int(ready_seconds * 1000),
        )
    if previous is not None and previous.pk != revision.pk:
        # The proxy sends nothing new to them; they finish what they hold, then stop.
        replicas_stop(revision=previous, grace_s=settings.MODELPORT_DRAIN_S, cause="superseded")
        if previous.handle:
            _runtime_of(previous).stop(previous.handle, grace_s=settings.MODELPORT_DRAIN_S)
    if locked.replicas_wanted != revision.replicas.filter(state=ReplicaState.READY).count():
        from portal.deployments.tasks import deployment_replicas_heal as replicas_heal_task

        # Scaled while the rollout ran, or a replica died meanwhile.
        transaction.on_commit(partial(replicas_heal_task.delay, locked.pk))


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
    replicas_stop(revision=revision, grace_s=1, cause="its rollout failed")
    if revision.handle:
        runtime.stop(revision.handle, grace_s=1)
    deployment = revision.deployment
    dead = None
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        revision.mark_failed(message=message)
        keeps = locked.current_revision
        if keeps is not None and keeps.pk != revision.pk and not _serving(keeps):
            # What was live has died too (a restart that failed): nothing serves.
            keeps.mark_failed(message="Its instance stopped and could not be restarted.")
            locked.current_revision = None
            dead, keeps = keeps, None
        # The first line is the cause, shown on its own; the detail (log lines) follows.
        cause, _, detail = message.partition("\n")
        locked.mark_failed(
            message=f"Version {revision.version.number} did not go live: {cause}"
            + (f" Version {keeps.version.number} keeps serving." if keeps else "")
            + (f"\n{detail}" if detail else "")
        )
        event_record(
            team=locked.model.team,
            deployment=locked,
            step="rollout",
            level=EventLevel.ERROR,
            message=locked.error.partition("\n")[0],
            data={"detail": detail[:4000]} if detail else None,
        )
    if dead is not None and dead.handle:
        _runtime_of(dead).stop(dead.handle, grace_s=1)


def _serving(revision: Revision) -> bool:
    if not revision.handle:
        return False
    try:
        return _runtime_of(revision).status(revision.handle).state == InstanceState.RUNNING
    except DeployerError:
        return False


def deployment_teardown(*, deployment_id: int, delete: bool) -> None:
    """Stop every instance of a deployment; delete the row too when asked."""
    deployment = Deployment.objects.select_related("model__team").filter(pk=deployment_id).first()
    if deployment is None:
        return
    proxy = engine.proxy()
    if proxy is not None:
        # First stop routing: the URL answers 404 from now on, not a dying instance.
        proxy.remove_route(f"d{deployment.pk}")
    for revision in deployment.revisions.filter(
        replicas__state__in=ACTIVE_REPLICA_STATES
    ).distinct():
        replicas_stop(revision=revision, grace_s=settings.MODELPORT_DRAIN_S, cause="stopped")
    for revision in deployment.revisions.exclude(handle=""):
        _runtime_of(revision).stop(revision.handle, grace_s=settings.MODELPORT_DRAIN_S)
    for runtime in engine.runtimes_in_use():
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
            deployment_pk = deployment.pk
            deployment.delete()
            transaction.on_commit(partial(deployment_keys_remove, deployment_id=deployment_pk))
            transaction.on_commit(partial(deployment_spool_remove, deployment_id=deployment_pk))
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
    """Compare deployments with the instances the runtimes own and repair the difference.

    Runs on the deploy worker. Dead live instances are restarted through a new
    revision; instances nobody wants (ours only: by label or state file) are
    stopped; proxy routes are brought back to what the rows say; rollouts or stops
    that lost their worker are handed back to one (or ended, when out of attempts).
    """
    from portal.deployments.tasks import deployment_teardown as teardown_task
    from portal.deployments.tasks import revision_rollout as rollout_task

    counts = {
        "restarted": 0,
        "orphans_stopped": 0,
        "requeued": 0,
        "failed": 0,
        "routes_changed": 0,
    }
    now = timezone.now()
    stale = now - timedelta(seconds=settings.MODELPORT_STALE_AFTER_S)
    lost = now - timedelta(seconds=60)
    runtimes = engine.runtimes_in_use()
    _record_engine_facts(runtimes)

    # A working revision is "active" while its worker keeps touching it; its instance
    # is wanted even before the handle reaches the row (it is labelled with the revision).
    working = Revision.objects.filter(status__in=WORKING_REVISION_STATUSES)
    active_ids = set(
        working.filter(
            Q(status=RevisionStatus.STARTING, updated_at__gte=stale)
            | Q(status=RevisionStatus.PENDING, updated_at__gte=lost)
        ).values_list("pk", flat=True)
    )
    wanted = set(
        Revision.objects.filter(status__in=[RevisionStatus.LIVE, *WORKING_REVISION_STATUSES])
        .exclude(handle="")
        .values_list("handle", flat=True)
    ) | set(
        Replica.objects.filter(state__in=ACTIVE_REPLICA_STATES)
        .exclude(handle="")
        .values_list("handle", flat=True)
    )
    for runtime in runtimes:
        for instance in runtime.owned():
            if instance.handle in wanted or instance.revision_id in active_ids:
                continue
            runtime.stop(instance.handle, grace_s=5)
            counts["orphans_stopped"] += 1
        if isinstance(runtime, DockerRuntime):
            if runtime.owned():
                runtime.ensure_log_shipper()
            runtime.prune_log_files()

    counts["routes_changed"] = _routes_sync(active_ids)
    # Keys files: drop keys that expired, repair a file a crash left behind, and
    # learn from the access logs when keys were last used.
    counts["keys_files"] = all_keys_write()
    counts["keys_used"] = keys_last_used_record()

    for deployment in Deployment.objects.filter(
        status__in=SERVING_DEPLOYMENT_STATUSES
    ).select_related("current_revision__version", "model__team"):
        current = deployment.current_revision
        if current is None or not current.handle:
            continue
        if current.replicas.exists():
            # Replicas: deaths the watcher missed (it was down) are handled as it would.
            counts["restarted"] += _replicas_reconcile(deployment, current)
            continue
        if _serving(current):
            continue
        if deployment.revisions.filter(status__in=WORKING_REVISION_STATUSES).exists():
            continue
        detail = _runtime_of(current).status(current.handle).detail
        with transaction.atomic():
            event_record(
                team=deployment.model.team,
                deployment=deployment,
                step="reconcile",
                level=EventLevel.WARNING,
                message=f"The instance of version {current.version.number} is gone"
                + (f" ({detail})" if detail else "")
                + "; restarting it",
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
        if revision.pk in active_ids:
            continue
        if revision.attempts >= settings.MODELPORT_TASK_MAX_ATTEMPTS:
            _rollout_failed(revision, _runtime_of(revision), "No worker finished the rollout.")
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


def _replicas_reconcile(deployment: Deployment, revision: Revision) -> int:
    """Mark READY replicas whose instance is gone as failed, and heal when short."""
    runtime = _runtime_of(revision)
    for replica in revision.replicas.filter(state=ReplicaState.READY).exclude(handle=""):
        try:
            status = runtime.status(replica.handle)
        except DeployerError:
            continue
        if status.state != InstanceState.RUNNING:
            replica_exited(
                handle=replica.handle,
                cause=f"is gone ({status.detail or status.state}; found by reconcile)",
            )
    from portal.deployments.tasks import deployment_replicas_heal as replicas_heal_task

    active = revision.replicas.filter(state__in=ACTIVE_REPLICA_STATES).count()
    if active != deployment.min_replicas:
        replicas_heal_task.delay(deployment.pk)
        return 1
    return 0


def _routes_sync(active_ids: set[int]) -> int:
    """Point every route at its deployment's live revision, as the rows say.

    Deployments whose rollout is running now are left to that rollout (it switches
    their route itself); after a worker died between switching the route and
    recording it, this puts the route back on the revision the rows call live.
    """
    proxy = engine.proxy()
    if proxy is None:
        return 0
    busy = set(Revision.objects.filter(pk__in=active_ids).values_list("deployment_id", flat=True))
    wanted: dict[str, Route] = {}
    current = proxy.routes()
    for deployment in Deployment.objects.exclude(current_revision=None).select_related(
        "current_revision", "model__team"
    ):
        key = f"d{deployment.pk}"
        if deployment.pk in busy:
            if key in current:
                wanted[key] = current[key]
            continue
        revision = deployment.current_revision
        assert revision is not None
        if revision.status == RevisionStatus.LIVE and revision.internal_url:
            try:
                wanted[key] = _route_for(deployment, revision)
            except ProxyError:
                log.warning("deployment %s cannot have a route", deployment.pk)
    try:
        return proxy.sync(wanted)
    except ProxyError as exc:
        log.warning("the proxy routes could not be synchronised: %s", exc)
        return 0


def _record_engine_facts(runtimes: list[Runtime]) -> None:
    """Tell the web process what the engine can do (it may not ask the engine itself)."""
    docker = next((r for r in runtimes if isinstance(r, DockerRuntime)), None)
    if docker is None:
        engine.engine_facts_record(runtime="local")
        return
    try:
        engine.engine_facts_record(runtime="docker", gpu_reason=docker.gpu_unavailable_reason())
    except DeployerError as exc:
        log.warning("the Docker engine could not be asked about GPUs: %s", exc)
