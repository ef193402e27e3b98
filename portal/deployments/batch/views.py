"""Pages for batch jobs: the list with a form to start one, and a job's live page."""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST
from rest_framework.exceptions import APIException

from portal.accounts.access import page_access
from portal.accounts.choices import Role
from portal.core.htmx import render_page_or_fragment
from portal.deployments.batch import selectors, services
from portal.deployments.batch.api import batch_output_response
from portal.deployments.batch.models import BatchJob


def _rows(job: BatchJob) -> list[dict[str, object]]:
    """The mapping as the page shows it: each model input with the columns that feed it."""
    inputs = {spec["name"]: spec for spec in job.version.signature.get("inputs", [])}
    return [
        {"input": name, "spec": inputs.get(name, {}), "columns": columns}
        for name, columns in job.mapping.items()
    ]


@login_required
def batch_job_list(request: HttpRequest) -> HttpResponse:
    """Every batch job of the team, live while any runs, and the form that starts one."""
    access = page_access(request)
    jobs = list(selectors.batch_job_list(team=access.team)[:100])
    context = {
        "jobs": jobs,
        "versions": selectors.batch_versions(team=access.team),
        "live": any(not job.is_final for job in jobs),
        "form": request.POST if request.method == "POST" else {},
    }
    if request.method == "POST":
        access.require_page(Role.MEMBER, "run batch jobs")
        try:
            job = _create(request, access)
        except APIException as exc:
            context["error"] = str(exc.detail)
            return render_page_or_fragment(
                request, "deployments/batch_list.html", "deployments/htmx/batch_rows.html", context
            )
        messages.success(request, f"Batch job {job.pk} queued: {job.total_rows} rows.")
        return redirect("deployments:batch_detail", job_id=job.pk)
    return render_page_or_fragment(
        request, "deployments/batch_list.html", "deployments/htmx/batch_rows.html", context
    )


def _create(request: HttpRequest, access: object) -> BatchJob:
    from portal.core.api import ApiError

    version_id = request.POST.get("version", "")
    version = next(
        (v for v in selectors.batch_versions(team=access.team) if str(v.pk) == version_id),  # type: ignore[attr-defined]
        None,
    )
    if version is None:
        raise ApiError("Choose a ready version.", code="version_required")
    upload = request.FILES.get("file")
    if upload is None:
        raise ApiError("Choose a file to score.", code="input_required")
    mapping = None
    if request.POST.get("mapping", "").strip():
        try:
            mapping = json.loads(request.POST["mapping"])
        except ValueError as exc:
            raise ApiError(f"The mapping is not JSON: {exc}", code="invalid_mapping") from None
        if not isinstance(mapping, dict):
            raise ApiError("The mapping must be a JSON object.", code="invalid_mapping")
    max_errors = request.POST.get("max_errors", "").strip()
    return services.batch_job_create(
        version=version,
        user=access.user,  # type: ignore[attr-defined]
        file=upload,
        mapping=mapping,
        max_errors=int(max_errors) if max_errors.lstrip("-").isdigit() else None,
    )


@login_required
def batch_job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    """A job: mapping, live progress (rows, rows/s, time left), errors, download, cancel."""
    access = page_access(request)
    job = selectors.batch_job_get(team=access.team, job_id=job_id)
    context = {"job": job, "mapping_rows": _rows(job), "access": access}
    return render_page_or_fragment(
        request, "deployments/batch_detail.html", "deployments/htmx/batch_status.html", context
    )


@login_required
@require_POST
def batch_job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    access = page_access(request)
    job = selectors.batch_job_get(team=access.team, job_id=job_id)
    access.require_page(Role.MEMBER, "cancel batch jobs")
    services.batch_job_cancel(job=job, user=access.user)
    messages.success(request, f"Cancelling batch job {job.pk}.")
    return redirect("deployments:batch_detail", job_id=job.pk)


@login_required
def batch_job_output(request: HttpRequest, job_id: int) -> FileResponse:
    job = selectors.batch_job_get(team=page_access(request).team, job_id=job_id)
    return batch_output_response(job)
