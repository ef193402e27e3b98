"""Reading models and versions, always inside one team."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.http import Http404

from portal.accounts.models import Team
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry.choices import FINAL_VERSION_STATUSES, VersionStatus
from portal.registry.models import Model, ModelVersion


def model_list(*, team: Team, search: str = "") -> QuerySet[Model]:
    """The team's models with their version count and latest version's number and status."""
    latest = ModelVersion.objects.filter(model=OuterRef("pk")).order_by("-number")
    models = Model.objects.filter(team=team).annotate(
        version_count=Count("versions", distinct=True),
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
    return model.versions.select_related("model__team", "created_by").order_by("-number")


def version_get(*, model: Model, number: int) -> ModelVersion:
    """The model's version ``number``, or 404."""
    version = (
        ModelVersion.objects.select_related("model__team", "created_by")
        .filter(model=model, number=number)
        .first()
    )
    if version is None:
        raise Http404(f"{model.name} has no version {number}.")
    return version
