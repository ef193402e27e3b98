"""Replicas: starting a revision's instances, replacing the ones that die, scaling.

Each replica is a row (:class:`Replica`) with the instance's handle and addresses. A
replica gets traffic only once it is READY: its instance answered ready and returned
the version's known answer. A READY replica whose instance ends (the watcher hears of
it from the runtime: :mod:`portal.deployments.watch`) is marked FAILED at once, taken
out of the route, and replaced by the deploy worker (``deployment_replicas_heal``),
after a back-off when the deployment's replicas keep dying.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.functions import Now
from django.utils import timezone

from deployer.autoscale import MIN_TARGET_INFLIGHT, AutoscalePolicy, decide, inflight
from deployer.checks import check_known_answer, wait_until_ready
from deployer.errors import DeployerError, LaunchError
from deployer.logs import failure_cause, strip_ansi
from deployer.monitoring import MetricsSnapshot, quantile
from deployer.proxy import Backend, ProxyError, Route, route_prefix
from deployer.runtimes.base import (
    HandsOverAddress,
    InstanceState,
    LaunchResult,
    LaunchSpec,
    Runtime,
)
from deployer.runtimes.gpus import GpuRequest
from portal.core import engine
from portal.core.api import ApiError
from portal.core.choices import EventLevel
from portal.core.services import event_record
from portal.deployments.async_inference import deployment_spool_prepare
from portal.deployments.choices import (
    ACTIVE_REPLICA_STATES,
    SERVING_DEPLOYMENT_STATUSES,
    WORKING_REVISION_STATUSES,
    DeploymentStatus,
    ReplicaState,
    RevisionStatus,
)
from portal.deployments.inference_keys import deployment_keys_write, portal_headers
from portal.deployments.models import MAX_REPLICAS, Deployment, Replica, Revision

if TYPE_CHECKING:
    from django.contrib.auth.models import User

log = logging.getLogger(__name__)

# Replicas of one deployment that ended within this window count towards its back-off.
BACKOFF_WINDOW = timedelta(minutes=10)
BACKOFF_MAX_S = 60.0


@dataclass(frozen=True)
class Started:
    """A replica whose instance was started (not yet proven)."""

    replica: Replica
    launch: LaunchResult


# ---------------------------------------------------------------- starting


def replica_start(
    *, revision: Revision, runtime: Runtime, slot: int, image: str, restarts: int = 0
) -> Started:
    """Claim ``slot`` of the revision with a STARTING row and start its instance.

    Raises ``IntegrityError`` when another replica already works in that slot.
    """
    deployment, version = revision.deployment, revision.version
    served = version.served_model_path
    if served is None:
        raise DeployerError(f"Version {version.number} has no served model file.")
    with transaction.atomic():
        replica = Replica.objects.create(
            revision=revision,
            deployment=deployment,
            slot=slot,
            restarts=restarts,
            runtime=runtime.name,
            started_at=timezone.now(),
        )
    keys_file = deployment_keys_write(deployment=deployment)
    try:
        launch = runtime.start(
            LaunchSpec(
                deployment_id=deployment.pk,
                revision_id=revision.pk,
                model_name=deployment.model.name,
                model_version=str(version.number),
                model_path=served,
                image=image,
                device=deployment.device,
                gpus=GpuRequest.parse(deployment.gpu_count, deployment.gpu_ids),
                cpus=float(deployment.cpus),
                memory_mb=deployment.memory_mb,
                pids_limit=deployment.pids_limit,
                labels={
                    "modelport.deployment": str(deployment.pk),
                    "modelport.revision": str(revision.pk),
                },
                keys_file=keys_file,
                warmup_sample=version.warmup_sample_path,
                async_dir=deployment_spool_prepare(deployment=deployment),
                async_max_queue=settings.MODELPORT_ASYNC_MAX_QUEUE,
                async_callback_hosts=",".join(settings.MODELPORT_ASYNC_CALLBACK_HOSTS),
                replica_id=replica.pk,
            )
        )
    except DeployerError as exc:
        _end(replica, ReplicaState.FAILED, f"it did not start: {exc.message}")
        raise
    replica.handle, replica.internal_url = launch.handle, launch.url
    replica.internal_grpc, replica.metrics_url = launch.grpc_address, launch.metrics_url
    replica.gpus = ",".join(launch.gpus)
    replica.save(
        update_fields=[
            "handle", "internal_url", "internal_grpc", "metrics_url", "gpus", "updated_at",
        ]
    )  # fmt: skip
    return Started(replica, launch)


def replica_prove(*, started: Started, runtime: Runtime) -> None:
    """Wait until the replica answers ready and returns the known answer (raises
    ``DeployerError`` saying why not)."""
    revision = started.replica.revision
    deployment, version = revision.deployment, revision.version
    handle = started.launch.handle
    wait_until_ready(
        started.launch.url,
        deployment.model.name,
        timeout_s=settings.MODELPORT_READY_TIMEOUT_S,
        still_running=lambda: runtime.status(handle).state == InstanceState.RUNNING,
        describe_failure=lambda: failure_detail(runtime, handle),
        headers=portal_headers(deployment.pk),
    )
    check_known_answer(
        started.launch.url,
        deployment.model.name,
        version.known_answer_path,
        tolerance=engine.known_answer_tolerance(deployment.device),
        headers=portal_headers(deployment.pk),
    )


def replica_mark_ready(replica: Replica) -> bool:
    """STARTING → READY (False when it ended meanwhile: the watcher saw it die)."""
    now = timezone.now()
    changed = Replica.objects.filter(pk=replica.pk, state=ReplicaState.STARTING).update(
        state=ReplicaState.READY, ready_at=now, updated_at=Now()
    )
    replica.state, replica.ready_at = ReplicaState.READY, now
    return bool(changed)


def failure_detail(runtime: Runtime, handle: str) -> str:
    """One line with the cause (the error the instance logged, how it stopped), then the
    last log lines as the detail."""
    status = runtime.status(handle)
    tail = strip_ansi(runtime.logs(handle, tail=15)).strip()
    cause = failure_cause(tail)
    stopped = f"the instance stopped: {status.detail}" if status.detail else ""
    head = "; ".join(part for part in (cause, stopped) if part) or "it wrote no error"
    head = head[0].upper() + head[1:]
    return f"{head}.\nLast log lines:\n{tail}" if tail else f"{head}. It wrote no log."


def _end(replica: Replica, state: str, cause: str) -> bool:
    """End an active replica (once: a conditional update)."""
    changed = Replica.objects.filter(pk=replica.pk, state__in=ACTIVE_REPLICA_STATES).update(
        state=state, cause=cause[:2000], ended_at=timezone.now(), updated_at=Now()
    )
    replica.state, replica.cause = state, cause
    return bool(changed)


def replicas_stop(*, revision: Revision, grace_s: float, cause: str = "") -> int:
    """Mark every active replica of the revision STOPPED, then stop its instance (the
    mark comes first, so the watcher does not take the stop for a death)."""
    ending = list(revision.replicas.filter(state__in=ACTIVE_REPLICA_STATES))
    for replica in ending:
        _end(replica, ReplicaState.STOPPED, cause)
    handles = [(r.runtime or revision.runtime, r.handle) for r in ending if r.handle]
    if handles:
        # They drain side by side: N replicas take one drain, not N.
        with ThreadPoolExecutor(max_workers=min(len(handles), MAX_REPLICAS)) as pool:
            for done in [
                pool.submit(engine.runtime_named(name).stop, handle, grace_s=grace_s)
                for name, handle in handles
            ]:
                done.result()
    return len(ending)


def revision_point_at_replica(revision: Revision) -> None:
    """Keep the revision's own instance fields on a READY replica (logs and the
    monitoring charts read them)."""
    replica = revision.replicas.filter(state=ReplicaState.READY).order_by("slot").first()
    if replica is None or replica.handle == revision.handle:
        return
    Revision.objects.filter(pk=revision.pk).update(
        handle=replica.handle,
        internal_url=replica.internal_url,
        internal_grpc=replica.internal_grpc,
        metrics_url=replica.metrics_url,
        updated_at=Now(),
    )
    revision.handle, revision.internal_url = replica.handle, replica.internal_url
    revision.internal_grpc, revision.metrics_url = replica.internal_grpc, replica.metrics_url


# ---------------------------------------------------------------- routes


def route_for(deployment: Deployment, revision: Revision) -> Route:
    """The deployment's route: every READY replica of ``revision`` (or, for a revision
    from before replicas, its one instance)."""
    backends = [
        Backend(r.internal_url.split("://", 1)[-1].rstrip("/"), r.internal_grpc)
        for r in revision.replicas.filter(state=ReplicaState.READY)
        if r.internal_url
    ]
    if not backends and revision.internal_url and not revision.replicas.exists():
        backends = [
            Backend(revision.internal_url.split("://", 1)[-1].rstrip("/"), revision.internal_grpc)
        ]
    return Route.of(
        key=f"d{deployment.pk}",
        prefix=route_prefix(deployment.model.team.slug, deployment.model.name, deployment.name),
        revision=revision.pk,
        backends=backends,
    )


def route_update(deployment: Deployment) -> str:
    """Point the live route at the READY replicas now ("" or why it could not).

    Without a proxy, replicas that hold the handed-over address take it over here.
    """
    if deployment.current_revision_id is None:
        return ""
    revision = (
        Revision.objects.select_related("deployment__model__team")
        .filter(pk=deployment.current_revision_id, status=RevisionStatus.LIVE)
        .first()
    )
    if revision is None:
        return ""
    proxy = engine.proxy()
    if proxy is None:
        return _take_over_all(revision)
    try:
        route = route_for(deployment, revision)
    except ProxyError:
        return "no replica is ready"  # the route keeps its last backends
    try:
        proxy.set_route(route)
    except ProxyError as exc:
        return str(exc)
    return ""


def _take_over_all(revision: Revision) -> str:
    runtime = engine.runtime_named(revision.runtime) if revision.runtime else engine.runtime()
    if not isinstance(runtime, HandsOverAddress):
        return ""
    for replica in revision.replicas.filter(state=ReplicaState.READY).exclude(handle=""):
        try:
            runtime.take_over(replica.handle)
        except LaunchError as exc:
            return exc.message
    return ""


# ---------------------------------------------------------------- deaths and healing


def replica_exited(*, handle: str, cause: str) -> bool:
    """A READY replica's instance ended: no more traffic to it, and replace it.

    Called by the watcher the moment the runtime tells of the end; a replica stopped
    on purpose (STOPPED first) or not yet READY is left alone (its rollout sees it).
    """
    from portal.deployments.tasks import deployment_replicas_heal

    replica = (
        Replica.objects.select_related("deployment__model__team", "revision__version")
        .filter(handle=handle, state=ReplicaState.READY)
        .first()
    )
    if replica is None or not _end(replica, ReplicaState.FAILED, cause):
        return False
    deployment = replica.deployment
    ready = Replica.objects.filter(revision=replica.revision, state=ReplicaState.READY).count()
    note = route_update(deployment) if ready else ""
    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        is_live = locked.current_revision_id == replica.revision_id
        if is_live and locked.status == DeploymentStatus.RUNNING:
            locked.status = DeploymentStatus.DEGRADED
            locked.save(update_fields=["status", "updated_at"])
        event_record(
            team=locked.model.team,
            deployment=locked,
            step="replica",
            level=EventLevel.ERROR,
            message=f"Replica {replica.slot + 1} of version {replica.revision.version.number} "
            f"({handle[:12]}) {cause}; it gets no traffic now"
            + (f" ({ready} still serving)" if ready else "; no replica is serving")
            + ("; replacing it" if is_live else "")
            + (f". The route was not updated: {note}" if note else ""),
            data={"replica": replica.pk, "cause": cause},
        )
        if is_live:
            transaction.on_commit(partial(deployment_replicas_heal.delay, deployment.pk))
    revision_point_at_replica(replica.revision)
    # What the dead instance left (an exited container, a state file) goes; its log stays.
    try:
        engine.runtime_named(replica.runtime).stop(handle, grace_s=1)
    except DeployerError as exc:
        log.warning("the remains of %s could not be removed: %s", handle[:12], exc)
    return True


def replica_unready(*, replica_id: int, cause: str) -> bool:
    """A READY replica stopped answering its readiness check: out of the route, stopped,
    replaced (as for a death)."""
    replica = Replica.objects.filter(pk=replica_id, state=ReplicaState.READY).first()
    if replica is None:
        return False
    return replica_exited(handle=replica.handle, cause=cause)


def backoff_left(deployment: Deployment) -> float:
    """Seconds before the next replacement may start: none after one failure, then
    2, 4, 8, … up to a minute after the last one, counted over the last ten minutes."""
    recent = deployment.replicas.filter(
        state=ReplicaState.FAILED, ended_at__gte=timezone.now() - BACKOFF_WINDOW
    )
    count = recent.count()
    if count <= 1:
        return 0.0
    last = recent.order_by("-ended_at").values_list("ended_at", flat=True).first()
    assert last is not None
    delay = min(2.0 ** (count - 1), BACKOFF_MAX_S)
    return max(0.0, delay - (timezone.now() - last).total_seconds())


def deployment_replicas_heal(*, deployment_id: int) -> dict[str, int]:
    """Bring the live revision's replicas to ``replicas_wanted``: replace those that ended
    (after the back-off), stop extras, and say RUNNING or DEGRADED."""
    from portal.deployments.tasks import deployment_replicas_heal as heal_task

    counts = {"started": 0, "failed": 0, "stopped": 0}
    deployment = (
        Deployment.objects.select_related("model__team", "current_revision__version")
        .filter(pk=deployment_id, status__in=SERVING_DEPLOYMENT_STATUSES)
        .first()
    )
    if deployment is None or deployment.current_revision is None:
        return counts
    if deployment.revisions.filter(status__in=WORKING_REVISION_STATUSES).exists():
        return counts  # the rollout starts the replicas it needs
    revision = deployment.current_revision
    if revision.status != RevisionStatus.LIVE or not revision.replicas.exists():
        return counts  # a revision from before replicas: reconcile restarts it
    want = deployment.replicas_wanted
    active = list(revision.replicas.filter(state__in=ACTIVE_REPLICA_STATES))
    extras = [r for r in active if r.slot >= want]
    for replica in extras:
        _end(replica, ReplicaState.STOPPED, f"scaled down to {want}")
    if extras:
        route_update(deployment)
        for replica in extras:
            if replica.handle:
                engine.runtime_named(replica.runtime).stop(
                    replica.handle, grace_s=settings.MODELPORT_DRAIN_S
                )
        counts["stopped"] = len(extras)
        event_record(
            team=deployment.model.team,
            deployment=deployment,
            step="replica",
            message=f"Stopped {len(extras)} replica(s): {deployment.name} runs {want} now",
        )
    missing = sorted(set(range(want)) - {r.slot for r in active})
    if missing:
        wait = backoff_left(deployment)
        if wait > 0:
            _status_set(deployment, revision)
            event_record(
                team=deployment.model.team,
                deployment=deployment,
                step="replica",
                level=EventLevel.WARNING,
                message=f"Replicas keep failing: the next replacement starts in {wait:.0f} s "
                "(back-off)",
            )
            heal_task.apply_async((deployment.pk,), countdown=wait)
            return counts
        runtime = engine.runtime_named(revision.runtime) if revision.runtime else engine.runtime()
        image = _image_of(revision, runtime)
        for slot in missing:
            restarts = (
                revision.replicas.filter(slot=slot).exclude(state__in=ACTIVE_REPLICA_STATES).count()
            )
            try:
                started = replica_start(
                    revision=revision, runtime=runtime, slot=slot, image=image, restarts=restarts
                )
            except IntegrityError:
                continue  # another healer took the slot
            except DeployerError as exc:
                counts["failed"] += 1
                _replacement_failed(deployment, revision, slot, exc.message)
                continue
            try:
                replica_prove(started=started, runtime=runtime)
            except DeployerError as exc:
                counts["failed"] += 1
                _end(started.replica, ReplicaState.FAILED, exc.message)
                runtime.stop(started.launch.handle, grace_s=1)
                _replacement_failed(deployment, revision, slot, exc.message)
                continue
            if not replica_mark_ready(started.replica):
                counts["failed"] += 1
                continue
            counts["started"] += 1
            note = route_update(deployment)
            event_record(
                team=deployment.model.team,
                deployment=deployment,
                step="replica",
                level=EventLevel.SUCCESS,
                message=f"Replica {slot + 1} of version {revision.version.number} is ready "
                f"({started.launch.handle[:12]}, replacement {restarts}) and gets traffic"
                + (f"; the route was not updated: {note}" if note else ""),
                data={"replica": started.replica.pk},
            )
        revision_point_at_replica(revision)
    _status_set(deployment, revision)
    if counts["failed"]:
        heal_task.apply_async((deployment.pk,), countdown=max(backoff_left(deployment), 1.0))
    return counts


def _replacement_failed(deployment: Deployment, revision: Revision, slot: int, why: str) -> None:
    event_record(
        team=deployment.model.team,
        deployment=deployment,
        step="replica",
        level=EventLevel.ERROR,
        message=f"Replica {slot + 1} of version {revision.version.number} could not be "
        f"replaced: {why}",
    )


def _image_of(revision: Revision, runtime: Runtime) -> str:
    """The image the revision's replicas run (what its first one was started from)."""
    from portal.deployments.services import _image_for

    return _image_for(revision, runtime)


def _status_set(deployment: Deployment, revision: Revision) -> str:
    """RUNNING with every replica ready, DEGRADED with fewer (and the count why)."""
    ready = revision.replicas.filter(state=ReplicaState.READY).count()
    want = deployment.replicas_wanted
    status = DeploymentStatus.RUNNING if ready >= want else DeploymentStatus.DEGRADED
    error = "" if status == DeploymentStatus.RUNNING else f"{ready} of {want} replicas are ready."
    Deployment.objects.filter(
        pk=deployment.pk,
        status__in=SERVING_DEPLOYMENT_STATUSES,
        current_revision_id=revision.pk,
    ).update(status=status, error=error, updated_at=Now())
    deployment.status, deployment.error = status, error
    return status


# ---------------------------------------------------------------- scaling


_KEEP: Any = object()


def deployment_scale(
    *,
    deployment: Deployment,
    min_replicas: int | None,
    max_replicas: int | None,
    user: User,
    target_inflight: float | None = _KEEP,
    cooldown_s: int | None = None,
) -> bool:
    """Change how many replicas serve the deployment, and its autoscaling (members;
    checked by the caller). ``target_inflight``: requests in flight per replica the
    autoscaler aims at; None or 0 turns it off (kept when not given).

    On the timeline; the deploy worker starts or stops replicas to match.
    """
    from portal.deployments.tasks import deployment_replicas_heal

    with transaction.atomic():
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        low = locked.min_replicas if min_replicas is None else min_replicas
        high = locked.max_replicas if max_replicas is None else max_replicas
        if max_replicas is None and high < low:
            high = low
        replicas_check(low, high)
        target = locked.autoscale_target_inflight if target_inflight is _KEEP else target_inflight
        target = target or None
        if target is not None and target < MIN_TARGET_INFLIGHT:
            raise ApiError(
                f"The autoscaling target must be at least {MIN_TARGET_INFLIGHT} requests in "
                "flight per replica (0 turns autoscaling off).",
                code="invalid_autoscale",
            )
        cooldown = locked.autoscale_cooldown_s if cooldown_s is None else cooldown_s
        now = (low, high, target, cooldown)
        before = (
            locked.min_replicas, locked.max_replicas, locked.autoscale_target_inflight,
            locked.autoscale_cooldown_s,
        )  # fmt: skip
        if now == before:
            return False
        wanted_before = locked.replicas_wanted
        locked.min_replicas, locked.max_replicas = low, high
        locked.autoscale_target_inflight, locked.autoscale_cooldown_s = target, cooldown
        if not locked.replica_target:
            locked.replica_target = wanted_before
        changed = (
            "min_replicas", "max_replicas", "autoscale_target_inflight", "autoscale_cooldown_s",
            "replica_target",
        )  # fmt: skip
        locked.save(update_fields=[*changed, "updated_at"])
        for name in changed:  # the caller's row reads what was saved
            setattr(deployment, name, getattr(locked, name))
        autoscale = (
            f"; autoscaling at {target:g} in flight per replica, cooldown {cooldown} s"
            if locked.autoscaling
            else ""
        )
        event_record(
            team=locked.model.team,
            actor=user,
            deployment=locked,
            step="scale",
            message=f"Replicas of {locked.name}: {before[0]}..{before[1]} → {low}..{high}"
            + autoscale,
            data={
                "min_replicas": low, "max_replicas": high, "autoscale_target_inflight": target,
                "autoscale_cooldown_s": cooldown,
            },
        )  # fmt: skip
        if locked.status in SERVING_DEPLOYMENT_STATUSES:
            transaction.on_commit(partial(deployment_replicas_heal.delay, locked.pk))
    return True


def replicas_check(low: int, high: int) -> None:
    """Refuse a replica range that cannot be (the API error names the problem)."""
    if low < 1:
        raise ApiError("min_replicas must be at least 1.", code="invalid_replicas")
    if high < low:
        raise ApiError(
            f"max_replicas ({high}) must not be below min_replicas ({low}).",
            code="invalid_replicas",
        )
    if high > MAX_REPLICAS:
        raise ApiError(f"max_replicas may be at most {MAX_REPLICAS}.", code="invalid_replicas")


# ---------------------------------------------------------------- each replica's traffic


def replica_metrics_record(*, replica: Replica, snapshot: MetricsSnapshot) -> None:
    """Its request rate, p99 and requests in flight since the previous scrape (the watcher
    scrapes)."""
    now = timezone.now()
    last = replica.metrics_last or {}
    rate = p99 = busy = None
    if last.get("at"):
        seconds = now.timestamp() - float(last["at"])
        requests = snapshot.success + snapshot.failure - float(last.get("total", 0))
        if seconds > 0 and requests >= 0:
            rate = requests / seconds
            busy = inflight(float(last.get("seconds", 0)), snapshot.latency_sum, seconds)
        before = {float(b): float(c) for b, c in last.get("buckets", [])}
        delta = [(b, c - before.get(b, 0.0)) for b, c in snapshot.latency_buckets]
        q = quantile(delta, 0.99) if delta and delta[-1][1] > 0 else None
        p99 = None if q is None else q * 1000
    Replica.objects.filter(pk=replica.pk).update(
        rate_per_s=rate,
        p99_ms=p99,
        inflight=busy,
        metrics_at=now,
        metrics_last={
            "at": now.timestamp(),
            "total": snapshot.success + snapshot.failure,
            "seconds": snapshot.latency_sum,
            "buckets": [["+Inf" if math.isinf(b) else b, c] for b, c in snapshot.latency_buckets],
        },
    )


# ---------------------------------------------------------------- autoscaling


def deployment_autoscale(*, deployment_id: int) -> str:
    """One autoscaling step: the replicas' requests in flight against the deployment's
    target; a change is recorded (timeline: the decision and why) and the deploy worker
    starts or stops replicas to match. Returns the decision's line ("" for none)."""
    from portal.deployments.tasks import deployment_replicas_heal

    fresh = timezone.now() - timedelta(seconds=3 * settings.MODELPORT_REPLICA_METRICS_S)
    with transaction.atomic():
        deployment = (
            Deployment.objects.select_for_update(of=("self",))
            .select_related("model__team", "current_revision")
            .filter(pk=deployment_id, status__in=SERVING_DEPLOYMENT_STATUSES)
            .first()
        )
        if deployment is None or not deployment.autoscaling or deployment.current_revision is None:
            return ""
        revision = deployment.current_revision
        if revision.status != RevisionStatus.LIVE:
            return ""
        if deployment.revisions.filter(status__in=WORKING_REVISION_STATUSES).exists():
            return ""  # a rollout is on
        active = list(revision.replicas.filter(state__in=ACTIVE_REPLICA_STATES))
        if any(r.state == ReplicaState.STARTING for r in active):
            return ""  # the last change is still coming up
        loads = [
            r.inflight
            for r in active
            if r.inflight is not None and r.metrics_at is not None and r.metrics_at >= fresh
        ]
        if len(loads) < len(active):
            return ""  # wait until every replica has been measured
        since = (
            (timezone.now() - deployment.scaled_at).total_seconds()
            if deployment.scaled_at
            else None
        )
        policy = AutoscalePolicy(
            min_replicas=deployment.min_replicas,
            max_replicas=deployment.max_replicas,
            target_inflight=float(deployment.autoscale_target_inflight or 1.0),
            cooldown_s=float(deployment.autoscale_cooldown_s),
        )
        decision = decide(policy, deployment.replicas_wanted, loads, since_last_change_s=since)
        if decision is None:
            return ""
        deployment.replica_target, deployment.scaled_at = decision.replicas, timezone.now()
        deployment.save(update_fields=["replica_target", "scaled_at", "updated_at"])
        event_record(
            team=deployment.model.team,
            deployment=deployment,
            step="autoscale",
            message=decision.reason,
            data={
                "before": decision.before,
                "replicas": decision.replicas,
                "inflight_per_replica": round(decision.inflight_per_replica, 3),
            },
        )
        transaction.on_commit(partial(deployment_replicas_heal.delay, deployment.pk))
    return decision.reason
