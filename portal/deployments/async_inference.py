"""Async inference on deployments: spool folders, queue figures, callback secrets, and the
targets of the async dispatcher (README "Async inference").

Instances spool ``Prefer: respond-async`` requests into ``<MODELPORT_ASYNC_DIR>/d<id>/``
(:mod:`deployer.serving.async_spool`), a folder that outlives every instance like the keys
file; the dispatcher (``manage.py async_dispatcher``, :mod:`deployer.async_dispatch`) runs
them through the deployment's address and signs callbacks with the team's secret.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from deployer.async_dispatch import DispatchSettings, Target
from deployer.serving.async_spool import QueueStats, Spool
from portal.accounts.models import Team
from portal.deployments.choices import DeploymentStatus
from portal.deployments.inference_keys import portal_headers
from portal.deployments.models import AsyncCallbackSecret, Deployment

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def spool_path(deployment_id: int) -> Path:
    """The async spool folder of one deployment."""
    return Path(settings.MODELPORT_ASYNC_DIR) / f"d{int(deployment_id)}"


def deployment_spool_prepare(*, deployment: Deployment) -> Path:
    """Create the deployment's spool folders (at every rollout); return the folder."""
    path = spool_path(deployment.pk)
    Spool(path).ensure()
    return path


def deployment_spool_remove(*, deployment_id: int) -> None:
    """Remove a deleted deployment's spool (its queued requests and answers go with it)."""
    shutil.rmtree(spool_path(deployment_id), ignore_errors=True)


def deployment_async_queue(*, deployment: Deployment) -> QueueStats:
    """Queue depth, the age of the oldest waiting request, answers kept, callbacks due."""
    return Spool(spool_path(deployment.pk)).stats()


def team_callback_secret(*, team: Team) -> str:
    """The team's callback signing secret, made on first use."""
    found = AsyncCallbackSecret.objects.filter(team=team).first()
    if found is not None:
        return found.secret
    try:
        with transaction.atomic():
            found = AsyncCallbackSecret.objects.create(team=team, secret=_new_secret())
    except IntegrityError:  # made by another process just now
        found = AsyncCallbackSecret.objects.get(team=team)
    return found.secret


def team_callback_secret_rotate(*, team: Team, user: User) -> str:
    """Replace the team's callback secret (recorded on the timeline); return the new one."""
    from portal.core.services import event_record

    secret = _new_secret()
    with transaction.atomic():
        AsyncCallbackSecret.objects.update_or_create(
            team=team, defaults={"secret": secret, "rotated_at": timezone.now()}
        )
        event_record(
            team=team, actor=user, step="async", message="Rotated the async callback secret"
        )
    return secret


def _new_secret() -> str:
    return "mpcs_" + secrets.token_urlsafe(32)


def _reachable(endpoint_url: str) -> str:
    """The stable address as the portal's own processes reach it (docker-compose: the
    proxy's service name, MODELPORT_PROXY_CHECK_URL, not the public URL)."""
    public = settings.MODELPORT_PROXY_URL.rstrip("/")
    check = settings.MODELPORT_PROXY_CHECK_URL.rstrip("/")
    if public and check and public != check and endpoint_url.startswith(public + "/"):
        return check + endpoint_url[len(public) :]
    return endpoint_url


def dispatch_settings() -> DispatchSettings:
    """The dispatcher's limits from the portal's settings."""
    return DispatchSettings(
        concurrency=settings.MODELPORT_ASYNC_CONCURRENCY,
        lease_s=float(settings.MODELPORT_ASYNC_LEASE_S),
        result_ttl_s=float(settings.MODELPORT_ASYNC_RESULT_TTL_S),
        max_wait_s=float(settings.MODELPORT_ASYNC_MAX_WAIT_S),
        callback_hosts=frozenset(settings.MODELPORT_ASYNC_CALLBACK_HOSTS),
        callback_attempts=settings.MODELPORT_ASYNC_CALLBACK_ATTEMPTS,
    )


def dispatch_targets() -> list[Target]:
    """Every deployment with a spool, as the dispatcher needs it: where to call it now
    (its stable address; None while no instance serves), the portal's key, the secret."""
    root = Path(settings.MODELPORT_ASYNC_DIR)
    try:
        present = {
            int(entry.name[1:])
            for entry in root.iterdir()
            if entry.name.startswith("d") and entry.name[1:].isdigit()
        }
    except FileNotFoundError:
        return []
    targets: list[Target] = []
    rows = Deployment.objects.filter(pk__in=present).select_related("model__team")
    secrets_by_team = {
        row.team_id: row.secret
        for row in AsyncCallbackSecret.objects.filter(
            team_id__in={deployment.model.team_id for deployment in rows}
        )
    }
    for deployment in rows:
        serving = deployment.status in (DeploymentStatus.RUNNING, DeploymentStatus.DEPLOYING)
        url = _reachable(deployment.endpoint_url.rstrip("/"))
        team_id = deployment.model.team_id
        secret = secrets_by_team.get(team_id) or team_callback_secret(team=deployment.model.team)
        targets.append(
            Target(
                deployment_id=deployment.pk,
                spool_dir=spool_path(deployment.pk),
                infer_url=f"{url}/infer" if serving and url else None,
                headers=portal_headers(deployment.pk),
                callback_secret=secret.encode(),
            )
        )
    return targets
