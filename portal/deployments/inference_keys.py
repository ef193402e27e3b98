"""The keys files of deployments: what the portal tells serving instances about keys.

Each deployment has one file, ``<keys dir>/d<id>/keys.json`` (``deployer.keys``),
rewritten whenever a key of its team is created or revoked, its public flag changes,
at every rollout and by reconcile. Instances re-read it within a second, so a
revocation takes effect with no restart. A folder per deployment lets a container
mount only its own deployment's file.

The portal calls private deployments with a key of its own (known-answer checks,
Try it): derived from the secret key and the deployment id, so web and workers agree
on it without storing it, and it is in every file under the id ``portal``.
"""

from __future__ import annotations

import hmac
import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from deployer.keys import KeyEntry, KeySet, key_sha256, write_keys_file
from portal.accounts.models import InferenceKey, Team
from portal.deployments.models import Deployment, Revision

log = logging.getLogger(__name__)

PORTAL_KEY_ID = "portal"


def keys_file_path(deployment_id: int) -> Path:
    """Where the keys file of a deployment lives (its own folder)."""
    return Path(settings.MODELPORT_KEYS_DIR) / f"d{int(deployment_id)}" / "keys.json"


def portal_key(deployment_id: int) -> str:
    """The portal's own key for one deployment (never stored; derived again when needed)."""
    digest = hmac.new(
        settings.SECRET_KEY.encode(), f"modelport-inference-key:{deployment_id}".encode(), "sha256"
    ).hexdigest()
    return f"mpk_portal_{digest}"


def portal_headers(deployment_id: int) -> dict[str, str]:
    """Headers with which the portal calls a deployment's instances."""
    return {"Authorization": f"Bearer {portal_key(deployment_id)}"}


def deployment_keyset(*, deployment: Deployment) -> KeySet:
    """The keys one deployment accepts: its team's active keys for all or for it, and ours."""
    now = timezone.now()
    rows = InferenceKey.objects.filter(
        Q(deployment__isnull=True) | Q(deployment=deployment),
        team_id=deployment.model.team_id,
        revoked_at__isnull=True,
    ).exclude(expires_at__lte=now)
    entries = [KeyEntry(id=PORTAL_KEY_ID, sha256=key_sha256(portal_key(deployment.pk)))]
    for row in rows:
        entries.append(
            KeyEntry(
                id=row.key_id,
                sha256=row.key_hash,
                expires_at=int(row.expires_at.timestamp()) if row.expires_at else None,
                rate_per_s=row.rate_per_s,
                burst=row.burst,
            )
        )
    return KeySet(public=deployment.public, keys=tuple(entries))


def deployment_keys_write(*, deployment: Deployment) -> Path:
    """Write one deployment's keys file (atomically) and return its path."""
    path = keys_file_path(deployment.pk)
    write_keys_file(path, deployment_keyset(deployment=deployment))
    return path


def deployment_keys_remove(*, deployment_id: int) -> None:
    """Remove a deleted deployment's keys folder."""
    shutil.rmtree(keys_file_path(deployment_id).parent, ignore_errors=True)


def team_keys_write(*, team: Team) -> int:
    """Rewrite the keys files of every deployment of ``team``; return how many."""
    count = 0
    for deployment in Deployment.objects.filter(model__team=team).select_related("model"):
        deployment_keys_write(deployment=deployment)
        count += 1
    return count


def all_keys_write() -> int:
    """Rewrite every deployment's keys file (reconcile: also drops expired keys)."""
    count = 0
    for deployment in Deployment.objects.select_related("model"):
        deployment_keys_write(deployment=deployment)
        count += 1
    return count


def keys_last_used_record(*, tail: int = 2000) -> int:
    """Set ``last_used_at`` of keys from the access logs of live instances.

    The serving runtime writes a JSON access line per request, with the id of the key
    that was accepted (``"key": "k_12"``); the portal reads the instances' log files
    (as for the log view) and keeps the newest time per key. Returns keys updated.
    """
    from portal.core import engine

    newest: dict[int, datetime] = {}
    for revision in Revision.objects.filter(status="live").exclude(handle=""):
        for line in engine.instance_logs(revision, tail=tail).splitlines():
            if '"key"' not in line:
                continue
            try:
                entry = json.loads(line)
                key_id, stamp = str(entry["key"]), str(entry["ts"])
                when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC)
            except (ValueError, KeyError, TypeError):
                continue
            if not key_id.startswith("k_") or not key_id[2:].isdigit():
                continue
            pk = int(key_id[2:])
            if pk not in newest or when > newest[pk]:
                newest[pk] = when
    updated = 0
    for pk, when in newest.items():
        updated += InferenceKey.objects.filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=when), pk=pk
        ).update(last_used_at=when)
    return updated
