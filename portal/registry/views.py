"""Pages for models and versions."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST
from rest_framework.exceptions import APIException

from portal.accounts.access import page_access
from portal.accounts.choices import Role
from portal.core.htmx import render_page_or_fragment
from portal.core.models import Event
from portal.deployments import selectors as deployment_selectors
from portal.deployments.choices import Device
from portal.deployments.services import gpu_unavailable_reason
from portal.registry import selectors, services
from portal.registry.choices import FINAL_VERSION_STATUSES
from portal.registry.forms import DeployForm, ModelCreateForm, UploadForm
from portal.registry.uploads import UploadTooLarge


@login_required
@require_http_methods(["GET", "POST"])
def model_list(request: HttpRequest) -> HttpResponse:
    """The team's models, with a search box and a form to create one."""
    access = page_access(request)
    form = ModelCreateForm(request.POST or None)
    if request.method == "POST":
        access.require_page(Role.MEMBER, "create models")
        if form.is_valid():
            try:
                model = services.model_create(
                    team=access.team, user=access.user, **form.cleaned_data
                )
            except ValidationError as exc:
                form.add_error("name", exc.message_dict.get("name", exc.messages))
            else:
                return redirect("registry:model_detail", name=model.name)
    search = request.GET.get("q", "").strip()
    models = list(selectors.model_list(team=access.team, search=search))
    polling = any(
        (m.latest_status and m.latest_status not in FINAL_VERSION_STATUSES)  # type: ignore[attr-defined]
        or any(not d.is_final for d in m.deployments.all())
        for m in models
    )
    context = {
        "models": models,
        "form": form,
        "search": search,
        "access": access,
        "polling": polling,
        "counts": selectors.team_counts(team=access.team),
    }
    return render_page_or_fragment(
        request, "registry/model_list.html", "registry/htmx/model_rows.html", context
    )


@login_required
def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    """A model's versions (live status) and deployments."""
    access = page_access(request)
    model = selectors.model_get(team=access.team, name=name)
    versions = list(selectors.version_list(model=model))
    context = {
        "model": model,
        "versions": versions,
        "polling": any(not v.is_final for v in versions),
        "deployments": deployment_selectors.deployment_list(team=access.team, model=model),
        "access": access,
    }
    return render_page_or_fragment(
        request, "registry/model_detail.html", "registry/htmx/version_rows.html", context
    )


@login_required
@require_http_methods(["GET", "POST"])
def version_upload(request: HttpRequest, name: str) -> HttpResponse:
    """Upload a new version (a plain form; the page's script adds a progress bar)."""
    access = page_access(request)
    model = selectors.model_get(team=access.team, name=name)
    wants_json = request.headers.get("X-Requested-With") == "XMLHttpRequest"
    if reason := access.denial(Role.MEMBER, "upload versions"):
        if wants_json:
            return JsonResponse({"error": reason}, status=403)
        raise PermissionDenied(reason)
    if request.method == "POST":
        try:
            form = UploadForm(request.POST, request.FILES)
            valid = form.is_valid()
        except UploadTooLarge as exc:
            return _upload_error(request, model, str(exc.detail), 413, wants_json)
        if valid:
            try:
                version = services.version_upload(
                    model=model,
                    file=form.cleaned_data["file"],
                    source_format=form.cleaned_data["format"],
                    sample=form.cleaned_data.get("sample_input"),
                    user=access.user,
                )
            except ValidationError as exc:
                return _upload_error(request, model, " ".join(exc.messages), 400, wants_json)
            url = reverse("registry:version_detail", args=[model.name, version.number])
            if wants_json:
                return JsonResponse({"redirect": url, "number": version.number}, status=201)
            return redirect(url)
        if wants_json:
            errors = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in form.errors.items())
            return JsonResponse({"error": errors}, status=400)
    else:
        form = UploadForm()
    return render(request, "registry/upload.html", {"model": model, "form": form, "access": access})


def _upload_error(
    request: HttpRequest, model: object, message: str, status: int, wants_json: bool
) -> HttpResponse:
    if wants_json:
        return JsonResponse({"error": message}, status=status)
    form = UploadForm()
    form.add_error(None, message)
    return render(request, "registry/upload.html", {"model": model, "form": form}, status=status)


@login_required
def version_detail(request: HttpRequest, name: str, number: int) -> HttpResponse:
    """A version's live timeline, signature, MLflow links and the deploy form."""
    access = page_access(request)
    model = selectors.model_get(team=access.team, name=name)
    version = selectors.version_get(model=model, number=number)
    events = (
        Event.objects.filter(version=version).select_related("actor").order_by("created_at", "id")
    )
    context = {
        "model": model,
        "version": version,
        "events": events,
        "access": access,
        "gpu_reason": gpu_unavailable_reason(),
        "devices": Device.choices,
        "deployments": deployment_selectors.deployment_list(team=access.team, model=model),
    }
    return render_page_or_fragment(
        request, "registry/version_detail.html", "registry/htmx/version_status.html", context
    )


@login_required
@require_POST
def version_deploy(request: HttpRequest, name: str, number: int) -> HttpResponse:
    """The Deploy button: roll this version out and go to the deployment's page."""
    from portal.deployments.services import deployment_deploy

    access = page_access(request)
    model = selectors.model_get(team=access.team, name=name)
    version = selectors.version_get(model=model, number=number)
    access.require_page(Role.MEMBER, "deploy")
    form = DeployForm(request.POST)
    if not form.is_valid():
        errors = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in form.errors.items())
        messages.error(request, f"Check the deployment settings: {errors}")
        return redirect("registry:version_detail", name=name, number=number)
    try:
        revision = deployment_deploy(
            version=version,
            name=form.cleaned_data["deployment"],
            device=form.cleaned_data["device"],
            cpus=form.cleaned_data["cpus"],
            memory_mb=form.cleaned_data["memory_mb"],
            user=access.user,
        )
    except APIException as exc:
        messages.error(request, str(exc.detail))
        return redirect("registry:version_detail", name=name, number=number)
    return redirect("deployments:detail", deployment_id=revision.deployment_id)
