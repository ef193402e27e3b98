"""Reading models and versions, always inside one team."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.http import Http404

from portal.accounts.models import Team
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry.choices import FINAL_VERSION_STATUSES, VersionStatus
from portal.registry.models import Model, ModelVersion


def model_list(*, team: Team, search: str = "") -> QuerySet[Model]:
    """The team's models with their version count and latest version's number and status."""
    latest = (
        ModelVersion.objects.filter(model=OuterRef("pk"))
        .exclude(status=VersionStatus.DELETED)
        .order_by("-number")
    )
    models = Model.objects.filter(team=team).annotate(
        version_count=Count(
            "versions", filter=~Q(versions__status=VersionStatus.DELETED), distinct=True
        ),
        latest_number=Subquery(latest.values("number")[:1]),
        latest_status=Subquery(latest.values("status")[:1]),
    )
    if search:
        models = models.filter(Q(name__icontains=search) | Q(description__icontains=search))
    serving = Prefetch(
        "deployments",
        queryset=Deployment.objects.select_related("current_revision__version").order_by("name"),
    )
    return models.prefetch_related(serving).order_by("name")


@dataclass(frozen=True)
class TeamCounts:
    """The numbers at the top of the models page."""

    models: int
    in_progress: int
    failed: int
    running: int


def team_counts(*, team: Team) -> TeamCounts:
    versions = ModelVersion.objects.filter(model__team=team)
    return TeamCounts(
        models=Model.objects.filter(team=team).count(),
        in_progress=versions.exclude(status__in=FINAL_VERSION_STATUSES).count(),
        failed=versions.filter(status=VersionStatus.FAILED).count(),
        running=Deployment.objects.filter(
            model__team=team, status=DeploymentStatus.RUNNING
        ).count(),
    )


def model_get(*, team: Team, name: str) -> Model:
    """The team's model called ``name``, or 404."""
    model = Model.objects.select_related("team").filter(team=team, name=name).first()
    if model is None:
        raise Http404(f"No model named {name!r} in team {team.slug}.")
    return model


def version_list(*, model: Model) -> QuerySet[ModelVersion]:
    """The model's versions, newest first; deleted ones are gone for readers."""
    return (
        model.versions.exclude(status=VersionStatus.DELETED)
        .select_related("model__team", "created_by")
        .order_by("-number")
    )


def version_get(*, model: Model, number: int) -> ModelVersion:
    """The model's version ``number``, or 404."""
    version = (
        ModelVersion.objects.select_related("model__team", "created_by")
        .filter(model=model, number=number)
        .first()
    )
    if version is None:
        raise Http404(f"{model.name} has no version {number}.")
    if version.is_deleted:
        raise Http404(f"Version {number} of {model.name} was deleted.")
    return version


def retained_versions(*, model: Model | None = None) -> dict[int, list[str]]:
    """Versions a deployment serves, is rolling out, or could roll back to, with why.

    Per deployment: the current and any working revision's version, plus the last
    ``MODELPORT_RETENTION_VERSIONS`` distinct versions that went live there. These
    are neither deletable nor collected.
    """
    from portal.deployments.choices import WORKING_REVISION_STATUSES
    from portal.deployments.models import Revision

    keep_last: int = settings.MODELPORT_RETENTION_VERSIONS
    revisions = Revision.objects.select_related("deployment")
    deployments = Deployment.objects.exclude(current_revision=None)
    if model is not None:
        revisions = revisions.filter(deployment__model=model)
        deployments = deployments.filter(model=model)
    kept: dict[int, list[str]] = {}
    for revision in revisions.filter(status__in=WORKING_REVISION_STATUSES):
        kept.setdefault(revision.version_id, []).append(
            f"{revision.deployment.name} is rolling it out"
        )
    for name, version_id in deployments.values_list("name", "current_revision__version_id"):
        kept.setdefault(version_id, []).append(f"{name} serves it")
    served: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for revision in revisions.filter(live_from__isnull=False).order_by(
        "deployment_id", "-live_from", "-id"
    ):
        recent = served.setdefault(revision.deployment_id, [])
        names[revision.deployment_id] = revision.deployment.name
        if revision.version_id not in recent and len(recent) < keep_last:
            recent.append(revision.version_id)
    for deployment_id, recent in served.items():
        for version_id in recent:
            reasons = kept.setdefault(version_id, [])
            if not any(r.startswith(f"{names[deployment_id]} ") for r in reasons):
                reasons.append(
                    f"{names[deployment_id]} could roll back to it (one of its last "
                    f"{keep_last} live versions, MODELPORT_RETENTION_VERSIONS)"
                )
    return kept


@dataclass(frozen=True)
class TeamStorage:
    """What one team stores: version files on disk and the model layers of its images."""

    team: Team
    versions: int
    deleted_pending: int
    file_bytes: int
    image_bytes: int
    images: int

    @property
    def total_bytes(self) -> int:
        return self.file_bytes + self.image_bytes


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist); links not followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def storage_by_team() -> list[TeamStorage]:
    """Disk usage per team: files in each version's folder, plus each distinct model image's
    own layer (what the build recorded: the web process never asks the Docker engine)."""
    rows = []
    for team in Team.objects.order_by("slug"):
        versions = ModelVersion.objects.filter(model__team=team, purged_at__isnull=True)
        file_bytes = 0
        images: dict[str, int] = {}
        count = pending = 0
        for version in versions.only("uid", "status", "image_ref", "report"):
            count += version.status != VersionStatus.DELETED
            pending += version.status == VersionStatus.DELETED
            file_bytes += folder_bytes(version.storage_dir)
            built = version.report.get("image", {})
            if version.image_ref:
                images[version.image_ref] = int(built.get("image_model_layer_bytes", 0))
        rows.append(
            TeamStorage(
                team=team,
                versions=count,
                deleted_pending=pending,
                file_bytes=file_bytes,
                image_bytes=sum(images.values()),
                images=len(images),
            )
        )
    return rows
