"""Reading deployments and revisions, always inside one team."""

from __future__ import annotations

import time
from collections.abc import Iterator

from django.db.models import QuerySet
from django.http import Http404

from deployer.logs import follow_file
from portal.accounts.models import Team
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment, Revision
from portal.registry.models import Model

# Statuses in which a deployment has an instance serving.
LIVE_DEPLOYMENT_STATUSES = (DeploymentStatus.RUNNING, DeploymentStatus.DEPLOYING)


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
    return revision, engine.instance_logs(revision, tail=tail)


def _log_revision(deployment: Deployment) -> Revision | None:
    """The revision whose instance log a deployment shows: the live one, else the latest
    that started an instance."""
    return deployment.current_revision or deployment.revisions.exclude(handle="").first()


def deployment_log_stream(*, deployment: Deployment, tail: int, seconds: int) -> Iterator[str]:
    """The live instance's last lines, then each new one, while the deployment runs on
    that instance (for at most ``seconds``). Read from the log file, like the tail."""
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
        if now - checked >= 2:  # is this instance still the deployment's?
            checked = now
            serving = Deployment.objects.filter(
                pk=deployment.pk,
                current_revision=revision,
                status__in=LIVE_DEPLOYMENT_STATUSES,
            ).exists()
        return serving

    yield from follow_file(path, tail=tail, keep_going=keep_going)


def revision_list(*, deployment: Deployment) -> QuerySet[Revision]:
    return deployment.revisions.select_related("version", "requested_by").order_by(
        "-created_at", "-id"
    )
