"""Storage garbage collection: what deleted versions and deleted models leave behind.

Runs on the deploy worker (the only process that talks to the Docker engine), on a
schedule and after each deletion. Idempotent: each run does what is still missing,
and a deleted version is ``purged`` only when its files, its image and its MLflow
mark are all done. Versions a deployment serves or could roll back to (see
``selectors.retained_versions``) are never collected.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from deployer.errors import DeployerError, TrackingError
from deployer.images.build import EngineUnavailable, docker_client
from deployer.images.cleanup import model_image_remove, model_images
from deployer.tracking import registered_model_mark_deleted, version_mark_deleted
from portal.accounts.models import Team
from portal.core import engine
from portal.core.choices import EventLevel
from portal.core.services import event_record
from portal.registry.choices import VersionStatus
from portal.registry.models import ModelVersion
from portal.registry.selectors import folder_bytes, retained_versions

log = logging.getLogger(__name__)
GC_DOCKER_TIMEOUT_S = 600


@dataclass
class CollectReport:
    """What one GC run removed, and what it had to leave for the next run."""

    versions_purged: int = 0
    file_bytes: int = 0
    images_removed: list[str] = field(default_factory=list)
    containers_removed: int = 0
    folders_removed: int = 0
    mlflow_marked: int = 0
    left: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "versions_purged": self.versions_purged,
            "file_bytes": self.file_bytes,
            "images_removed": len(self.images_removed),
            "containers_removed": self.containers_removed,
            "folders_removed": self.folders_removed,
            "mlflow_marked": self.mlflow_marked,
            "left": len(self.left),
        }


def _wanted_refs() -> set[str]:
    """Image tags some version that is not deleted still points at."""
    wanted: set[str] = set()
    for image_ref, report in ModelVersion.objects.exclude(status=VersionStatus.DELETED).values_list(
        "image_ref", "report"
    ):
        if image_ref:
            wanted.add(image_ref)
        wanted.update(str(ref) for ref in (report or {}).get("images", {}).values() if ref)
    return wanted


def _client() -> Any | None:
    if not engine.builds_images():
        return None
    try:
        # Removing layers on a busy engine can take minutes.
        return docker_client(timeout_s=GC_DOCKER_TIMEOUT_S)
    except EngineUnavailable:
        return None


def storage_collect(*, deleted_models: list[str] | None = None) -> CollectReport:
    """Remove the files, images and containers of deleted versions and models.

    ``deleted_models`` are MLflow names of models deleted just now; their
    registered models are tagged deleted.
    """
    report = CollectReport()
    client = _client()
    wanted = _wanted_refs()
    _stop_orphan_containers(report)
    _purge_deleted_versions(report, client, wanted)
    if client is not None:
        _remove_orphan_images(report, client, wanted)
    _remove_orphan_folders(report)
    for name in deleted_models or []:
        try:
            registered_model_mark_deleted(
                engine.tracking_target(), name, deleted_at=datetime.now(UTC).isoformat()
            )
            report.mlflow_marked += 1
        except TrackingError as exc:
            report.left.append(f"MLflow model {name}: {exc.message}")
    log.info("storage gc: %s", report.as_dict())
    return report


def _purge_deleted_versions(report: CollectReport, client: Any | None, wanted: set[str]) -> None:
    pending = ModelVersion.objects.filter(
        status=VersionStatus.DELETED, purged_at__isnull=True
    ).select_related("model__team")
    if not pending:
        return
    retained = retained_versions()
    for version in pending:
        if version.pk in retained:
            report.left.append(f"{version}: a deployment may still roll back to it")
            continue
        _purge_version(report, version, client, wanted)


def _purge_version(
    report: CollectReport, version: ModelVersion, client: Any | None, wanted: set[str]
) -> None:
    notes: list[str] = []
    done = True
    freed = folder_bytes(version.storage_dir)
    shutil.rmtree(version.storage_dir, ignore_errors=True)
    if version.storage_dir.exists():
        done = False
        report.left.append(f"{version}: its folder could not be removed")
    else:
        report.file_bytes += freed
        notes.append(f"{freed / 1e6:.2f} MB of files")
    refs = {version.image_ref, *version.report.get("images", {}).values()} - {""}
    for ref in sorted(str(r) for r in refs):
        if ref in wanted:
            notes.append(f"image {ref} kept (another version has the same content)")
            continue
        if client is None:
            done = False
            report.left.append(f"{version}: image {ref} waits for the Docker engine")
            continue
        removal = model_image_remove(client, ref, installation=settings.MODELPORT_INSTALLATION_ID)
        if removal.gone:
            if removal.removed:
                report.images_removed.append(ref)
                notes.append(f"image {ref} removed")
        else:
            done = False
            report.left.append(f"{version}: image {ref} kept: {removal.reason}")
    if version.mlflow_version:
        try:
            aliases = version_mark_deleted(
                engine.tracking_target(),
                version.model.mlflow_name,
                version.mlflow_version,
                deleted_at=(version.deleted_at or timezone.now()).isoformat(),
            )
        except TrackingError as exc:
            done = False
            report.left.append(f"{version}: {exc.message}")
        else:
            report.mlflow_marked += 1
            notes.append(
                f"MLflow version {version.mlflow_version} tagged modelport_deleted=true"
                + (f", aliases {', '.join(aliases)} removed" if aliases else "")
            )
    if not done:
        return
    ModelVersion.objects.filter(pk=version.pk, purged_at__isnull=True).update(
        purged_at=timezone.now()
    )
    report.versions_purged += 1
    event_record(
        team=version.model.team,
        version=version,
        step="gc",
        message=f"Storage of deleted version {version.number} collected: " + "; ".join(notes),
        data={"file_bytes": freed, "images": sorted(str(r) for r in refs)},
    )


def _remove_orphan_images(report: CollectReport, client: Any, wanted: set[str]) -> None:
    """Model images no version points at any more: left by deleted models."""
    busy = ModelVersion.objects.filter(status=VersionStatus.BUILDING).exists()
    if busy:
        # A build records its image only after it finishes: do not race it.
        return
    live_uids = {
        str(uid)
        for uid in ModelVersion.objects.exclude(status=VersionStatus.DELETED).values_list(
            "uid", flat=True
        )
    }
    installation = settings.MODELPORT_INSTALLATION_ID
    for image in model_images(client, installation=installation):
        if image.labels.get("modelport.version-uid") in live_uids:
            continue
        for tag in image.tags:
            if tag in wanted:
                continue
            removal = model_image_remove(client, tag, installation=installation)
            if removal.removed:
                report.images_removed.append(tag)
                _team_event(
                    image.labels.get("modelport.team", ""),
                    f"Image {tag} of deleted model {image.labels.get('modelport.model', '?')} "
                    "removed",
                )
            elif not removal.gone:
                report.left.append(f"image {tag}: {removal.reason}")


def _stop_orphan_containers(report: CollectReport) -> None:
    """Instances whose deployment no longer exists (its model was deleted)."""
    from portal.deployments.models import Deployment

    known = set(Deployment.objects.values_list("pk", flat=True))
    try:
        runtimes = engine.runtimes_in_use()
        for runtime in runtimes:
            for instance in runtime.owned():
                if instance.deployment_id not in known:
                    runtime.stop(instance.handle, grace_s=1)
                    report.containers_removed += 1
    except DeployerError as exc:
        report.left.append(f"instances: {exc.message}")


def _remove_orphan_folders(report: CollectReport) -> None:
    """Version folders without a row (a model deleted while its removal was lost).

    Only folders untouched for ``MODELPORT_STALE_AFTER_S``: an upload writes its
    folder before its row is committed.
    """
    root = Path(settings.MODELPORT_STORAGE_DIR) / "versions"
    if not root.is_dir():
        return
    known = {str(uid) for uid in ModelVersion.objects.values_list("uid", flat=True)}
    cutoff = time.time() - settings.MODELPORT_STALE_AFTER_S
    for folder in root.iterdir():
        if folder.name in known or not folder.is_dir() or folder.is_symlink():
            continue
        if folder.stat().st_mtime > cutoff:
            continue
        report.file_bytes += folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        report.folders_removed += 1


def _team_event(slug: str, message: str) -> None:
    team = Team.objects.filter(slug=slug).first() if slug else None
    if team is not None:
        event_record(team=team, step="gc", level=EventLevel.INFO, message=message)
