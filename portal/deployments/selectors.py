"""Reading deployments and revisions, always inside one team."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.db import close_old_connections
from django.db.models import QuerySet
from django.http import Http404

from deployer.logs import follow_file, follow_file_async, strip_ansi
from portal.accounts.models import Team
from portal.deployments.choices import ACTIVE_REPLICA_STATES, DeploymentStatus
from portal.deployments.models import Deployment, Replica, Revision
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion

# Statuses in which a deployment has an instance serving.
LIVE_DEPLOYMENT_STATUSES = (
    DeploymentStatus.RUNNING,
    DeploymentStatus.DEGRADED,
    DeploymentStatus.DEPLOYING,
)


def replica_list(*, deployment: Deployment, ended: int = 6) -> list[Replica]:
    """The live revision's replicas that serve or start, then the last ``ended`` that ended."""
    if deployment.current_revision_id is None:
        return []
    rows = Replica.objects.filter(revision_id=deployment.current_revision_id).select_related(
        "revision__version"
    )
    active = list(rows.filter(state__in=ACTIVE_REPLICA_STATES).order_by("slot"))
    gone = list(rows.exclude(state__in=ACTIVE_REPLICA_STATES).order_by("-ended_at", "-id")[:ended])
    return active + gone


def deployment_list(*, team: Team, model: Model | None = None) -> QuerySet[Deployment]:
    deployments = Deployment.objects.filter(model__team=team).select_related(
        "model__team", "current_revision__version"
    )
    if model is not None:
        deployments = deployments.filter(model=model)
    return deployments.order_by("model__name", "name")


def deployment_get(*, team: Team, deployment_id: int) -> Deployment:
    """The team's deployment with this id, or 404 (also for other teams' deployments)."""
    deployment = (
        Deployment.objects.select_related("model__team", "current_revision__version")
        .filter(pk=deployment_id, model__team=team)
        .first()
    )
    if deployment is None:
        raise Http404(f"No deployment {deployment_id} in team {team.slug}.")
    return deployment


def deployment_log_lines(*, deployment: Deployment, tail: int = 200) -> tuple[Revision | None, str]:
    """The last lines written by the deployment's live instance (or its latest attempt).

    Read from files in the data directory, so the web process needs no Docker socket.
    """
    from portal.core import engine

    revision = _log_revision(deployment)
    if revision is None or not revision.handle:
        return revision, ""
    return revision, strip_ansi(engine.instance_logs(revision, tail=tail))


def _log_revision(deployment: Deployment) -> Revision | None:
    """The revision whose instance log a deployment shows: the live one, else the latest
    that started an instance."""
    return deployment.current_revision or deployment.revisions.exclude(handle="").first()


def deployment_log_stream(*, deployment: Deployment, tail: int, seconds: int) -> Iterator[str]:
    """The live instance's last lines, then each new one, while the deployment runs on
    that instance (for at most ``seconds``). Read from the log file, like the tail.

    This one holds its thread while it waits (WSGI); ``deployment_log_stream_async``
    is what the web server serves."""
    from portal.core import engine

    revision = _log_revision(deployment)
    path = engine.instance_log_file(revision) if revision is not None else None
    if revision is None or path is None:
        return
    deadline = time.monotonic() + seconds
    checked = time.monotonic()
    serving = deployment.status in LIVE_DEPLOYMENT_STATUSES

    def keep_going() -> bool:
        nonlocal checked, serving
        now = time.monotonic()
        if now >= deadline or not serving:
            return False
        if now - checked >= SERVING_CHECK_S:  # is this instance still the deployment's?
            checked = now
            serving = _still_serving(deployment.pk, revision.pk)
        return serving

    for line in follow_file(path, tail=tail, keep_going=keep_going):
        yield strip_ansi(line)


def deployment_log_stream_async(
    *, deployment: Deployment, tail: int, seconds: int
) -> AsyncIterator[str]:
    """``deployment_log_stream`` for an ASGI server: it holds no thread while it waits,
    and no database connection (the check runs in a shared pool, once per deployment
    and process however many follow it). Call it where the ORM may be used; iterate it
    on the event loop."""
    from portal.core import engine

    revision = _log_revision(deployment)
    path = engine.instance_log_file(revision) if revision is not None else None
    deadline = time.monotonic() + seconds
    serving = deployment.status in LIVE_DEPLOYMENT_STATUSES

    async def keep_going() -> bool:
        if time.monotonic() >= deadline or not serving:
            return False
        assert revision is not None
        return await _still_serving_shared(deployment.pk, revision.pk)

    async def lines() -> AsyncIterator[str]:
        # The view's thread opened a connection; a stream of minutes must not keep it.
        await sync_to_async(close_old_connections)()
        if revision is None or path is None:
            return
        async for line in follow_file_async(path, tail=tail, keep_going=keep_going):
            yield strip_ansi(line)

    return lines()


# How often a follower asks whether its instance is still the deployment's.
SERVING_CHECK_S = 2.0
_serving_answers: dict[
    tuple[asyncio.AbstractEventLoop, int, int], tuple[float, asyncio.Future[bool]]
] = {}


def _still_serving(deployment_id: int, revision_id: int) -> bool:
    return Deployment.objects.filter(
        pk=deployment_id, current_revision_id=revision_id, status__in=LIVE_DEPLOYMENT_STATUSES
    ).exists()


def _checked_in_pool(deployment_id: int, revision_id: int) -> bool:
    close_old_connections()  # a pool thread has no requests to close its connection
    return _still_serving(deployment_id, revision_id)


async def _still_serving_shared(deployment_id: int, revision_id: int) -> bool:
    """The answer of ``_still_serving`` at most SERVING_CHECK_S old, shared by every
    follower of the same instance in this process."""
    key = (asyncio.get_running_loop(), deployment_id, revision_id)
    now = time.monotonic()
    cached = _serving_answers.get(key)
    if cached is None or now - cached[0] >= SERVING_CHECK_S:
        answer = asyncio.ensure_future(
            sync_to_async(_checked_in_pool, thread_sensitive=False)(deployment_id, revision_id)
        )
        _serving_answers[key] = cached = (now, answer)
        for old in [k for k, (at, _) in _serving_answers.items() if now - at > 60]:
            del _serving_answers[old]
    return await asyncio.shield(cached[1])


def revision_list(*, deployment: Deployment) -> QuerySet[Revision]:
    return deployment.revisions.select_related("version", "requested_by").order_by(
        "-created_at", "-id"
    )


def deployment_rollback_targets(*, deployment: Deployment) -> list[ModelVersion]:
    """The versions this deployment can roll back to: ones that went live on it before.

    A version whose rollout here failed (or never finished) never served this endpoint,
    so "roll back" to it would be a first deploy in disguise; the one serving now is left
    out too. Newest first, each version once.
    """
    went_live = Revision.objects.filter(deployment=deployment, live_from__isnull=False)
    targets = ModelVersion.objects.filter(
        pk__in=went_live.values("version_id"), status=VersionStatus.READY
    )
    if deployment.current_revision is not None:
        targets = targets.exclude(pk=deployment.current_revision.version_id)
    return list(targets.order_by("-number"))


def version_rollback_deployments(*, version: ModelVersion) -> list[Deployment]:
    """The running deployments that could roll back to this version: it went live on
    each of them before, and each serves another version now."""
    if not version.is_ready:
        return []
    return list(
        Deployment.objects.filter(
            model_id=version.model_id,
            status__in=[DeploymentStatus.RUNNING, DeploymentStatus.DEGRADED],
            revisions__version=version,
            revisions__live_from__isnull=False,
        )
        .exclude(current_revision__version=version)
        .exclude(current_revision=None)
        .select_related("current_revision__version")
        .distinct()
        .order_by("name")
    )
