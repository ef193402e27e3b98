"""Pages for models and versions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST
from rest_framework.exceptions import APIException

from deployer.logs import tail_lines
from portal.accounts.access import page_access
from portal.accounts.choices import Role
from portal.core.htmx import render_page_or_fragment
from portal.core.models import Event
from portal.deployments import selectors as deployment_selectors
from portal.deployments.choices import Device
from portal.deployments.services import gpu_unavailable_reason
from portal.registry import selectors, services
from portal.registry.choices import FINAL_VERSION_STATUSES, SourceFormat
from portal.registry.forms import DeployForm, ModelCreateForm
from portal.registry.serializers import VersionUploadSerializer
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
    """Upload a new version (a plain form; the page's script adds a progress bar).

    The form is validated by the API's upload serializer, so both take the same
    fields and give the same messages.
    """
    access = page_access(request)
    model = selectors.model_get(team=access.team, name=name)
    wants_json = request.headers.get("X-Requested-With") == "XMLHttpRequest"
    if reason := access.denial(Role.MEMBER, "upload versions"):
        if wants_json:
            return JsonResponse({"error": reason}, status=403)
        raise PermissionDenied(reason)
    error, status = "", 200
    if request.method == "POST":
        try:
            data = request.POST.copy()
            data.update(request.FILES)  # type: ignore[arg-type]  # QueryDict takes files too
            form = VersionUploadSerializer(data=data)
            valid = form.is_valid()
        except UploadTooLarge as exc:
            valid, error, status = False, str(exc.detail), 413
        if valid:
            fields = form.validated_data
            try:
                version = services.version_upload(
                    model=model,
                    file=fields["file"],
                    source_format=fields.get("format") or "",
                    sample=fields.get("sample_input"),
                    options=form.options(),
                    user=access.user,
                )
            except ValidationError as exc:
                error, status = " ".join(exc.messages), 400
            else:
                url = reverse("registry:version_detail", args=[model.name, version.number])
                if wants_json:
                    return JsonResponse({"redirect": url, "number": version.number}, status=201)
                return redirect(url)
        elif not error:
            error = "; ".join(
                f"{key.replace('_', ' ')}: {' '.join(map(str, value))}"
                for key, value in form.errors.items()
            )
            status = 400
        if wants_json:
            return JsonResponse({"error": error}, status=status)
    context = {
        "model": model,
        "access": access,
        "error": error,
        "formats": _format_choices(),
        "values": request.POST if request.method == "POST" else {},
    }
    return render(request, "registry/upload.html", context, status=status)


def _format_choices() -> list[dict[str, str]]:
    """Each format with how this server handles it (converted in a container, locally,
    or refused and why), for the upload page."""
    from deployer.convert.formats import NEEDS, Format
    from deployer.images.build import engine_available
    from portal.registry.conversion import accepted_formats

    handling = accepted_formats(docker=engine_available())
    choices = []
    for value, label in SourceFormat.choices:
        how = handling.get(value, "local")
        choices.append(
            {"value": value, "label": label, "how": how, "needs": NEEDS.get(Format(value), "")}
        )
    return choices


@login_required
def version_detail(request: HttpRequest, name: str, number: int) -> HttpResponse:
    """A version's live timeline, signature, MLflow links and the deploy form."""
    access = page_access(request)
    model = selectors.model_get(team=access.team, name=name)
    version = selectors.version_get(model=model, number=number)
    events = _fold_build_steps(
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
        "rollback_deployments": deployment_selectors.version_rollback_deployments(version=version),
        "conversion": version.report.get("conversion"),
        "conversion_variants": [
            variant
            for variant in (
                (version.report.get("conversion") or {}).get("optimization"),
                (version.report.get("conversion") or {}).get("quantization"),
            )
            if variant
        ],
        "image": version.report.get("image"),
        "build_log": tail_lines(version.storage_dir / "build.log", 200),
    }
    return render_page_or_fragment(
        request, "registry/version_detail.html", "registry/htmx/version_status.html", context
    )


@dataclass
class _FoldedSteps:
    """Consecutive Docker build steps shown as one timeline entry that opens to all of them."""

    first: Event
    steps: list[str] = field(default_factory=list)
    last: Event | None = None
    step = "build"
    level = "info"
    duration_ms = None
    actor = None

    @property
    def message(self) -> str:
        # The timeline keeps no LABEL steps, so "Step n/M" counts more than are listed.
        total = _BUILD_STEP.match(self.steps[-1]) if self.steps else None
        count = int(total.group(1)) if total else len(self.steps)
        if count == len(self.steps):
            return f"Docker build, {count} steps"
        return f"Docker build, {count} steps ({len(self.steps)} listed, labels left out)"

    @property
    def created_at(self) -> Any:
        return (self.last or self.first).created_at


def _fold_build_steps(events: Iterable[Event]) -> list[Event | _FoldedSteps]:
    """The timeline with each run of ``Step N/M : …`` build lines folded into one entry."""
    folded: list[Event | _FoldedSteps] = []
    for event in events:
        if event.step == "build" and _BUILD_STEP.match(event.message):
            last = folded[-1] if folded else None
            if not isinstance(last, _FoldedSteps):
                last = _FoldedSteps(first=event)
                folded.append(last)
            last.steps.append(event.message)
            last.last = event
            continue
        folded.append(event)
    return folded


_BUILD_STEP = re.compile(r"^Step \d+/(\d+) : ")


def _gpu_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The GPU request of the Deploy form, given only for a GPU deploy."""
    if data["device"] != "gpu" or not (data["gpu_count"] or data["gpu_ids"]):
        return {}
    return {"gpu_count": data["gpu_count"], "gpu_ids": data["gpu_ids"]}


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
            **_gpu_fields(form.cleaned_data),
            user=access.user,
        )
    except APIException as exc:
        messages.error(request, str(exc.detail))
        return redirect("registry:version_detail", name=name, number=number)
    return redirect("deployments:detail", deployment_id=revision.deployment_id)
