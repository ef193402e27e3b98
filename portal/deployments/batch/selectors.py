"""Reads of batch jobs, always within one team."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404

from portal.accounts.models import Team
from portal.deployments.batch.models import BatchJob
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion


def batch_job_list(*, team: Team, model: Model | None = None) -> QuerySet[BatchJob]:
    """The team's batch jobs, newest first (only ``model``'s when given)."""
    jobs = BatchJob.objects.select_related("version__model", "created_by").filter(
        version__model__team=team
    )
    return jobs.filter(version__model=model) if model is not None else jobs


def batch_job_get(*, team: Team, job_id: int) -> BatchJob:
    """The team's job with this id, or 404 (also for another team's job)."""
    job = batch_job_list(team=team).filter(pk=job_id).first()
    if job is None:
        raise Http404(f"No batch job {job_id} in team {team.slug}.")
    return job


def batch_versions(*, team: Team) -> QuerySet[ModelVersion]:
    """The team's versions that can score a batch (ready, not deleted), for the page's form."""
    return (
        ModelVersion.objects.select_related("model")
        .filter(model__team=team, status=VersionStatus.READY, deleted_at__isnull=True)
        .order_by("model__name", "-number")
    )
