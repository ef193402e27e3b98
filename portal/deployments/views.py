"""Pages for deployments: status, endpoint, snippets, revisions, rollback and stop."""

from __future__ import annotations

import json

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from rest_framework.exceptions import APIException

from portal.accounts.access import page_access
from portal.core.htmx import render_page_or_fragment
from portal.core.models import Event
from portal.deployments import selectors, services
from portal.registry import selectors as registry_selectors
from portal.registry.models import ModelVersion


@login_required
def deployment_list(request: HttpRequest) -> HttpResponse:
    access = page_access(request)
    deployments = selectors.deployment_list(team=access.team)
    return render(request, "deployments/list.html", {"deployments": deployments})


def curl_example(deployment_url: str, version: ModelVersion | None) -> str:
    """A curl command that calls the endpoint with a request shaped like the model's input."""
    inputs = []
    for spec in version.signature.get("inputs", []) if version else []:
        shape = [1 if d < 0 else d for d in spec["shape"]]
        count = 1
        for dim in shape:
            count *= dim
        value: object = "text" if spec["datatype"] == "BYTES" else 0
        data = [value] * min(count, 8) + (["..."] if count > 8 else [])
        inputs.append(
            {"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": data}
        )
    body = json.dumps({"inputs": inputs})
    return (
        f"curl -s -X POST {deployment_url}/infer \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d '{body}'"
    )


@login_required
def deployment_detail(request: HttpRequest, deployment_id: int) -> HttpResponse:
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    revisions = list(selectors.revision_list(deployment=deployment))
    current = deployment.current_revision
    events = (
        Event.objects.filter(deployment=deployment)
        .select_related("actor")
        .order_by("-created_at", "-id")[:50]
    )
    rollback_targets = [
        v
        for v in registry_selectors.version_list(model=deployment.model)
        if v.is_ready and (current is None or v.pk != current.version_id)
    ]
    context = {
        "deployment": deployment,
        "revisions": revisions,
        "events": events,
        "access": access,
        "curl": curl_example(deployment.endpoint_url, current.version if current else None)
        if deployment.endpoint_url
        else "",
        "rollback_targets": rollback_targets,
        "token_hint": settings.PUBLIC_URL,
    }
    return render_page_or_fragment(
        request, "deployments/detail.html", "deployments/htmx/status.html", context
    )


@login_required
@require_POST
def deployment_rollback(request: HttpRequest, deployment_id: int) -> HttpResponse:
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    if not access.is_admin:
        messages.error(request, "Only team admins can roll back.")
        return redirect("deployments:detail", deployment_id=deployment.pk)
    try:
        number = int(request.POST.get("version", ""))
        version = registry_selectors.version_get(model=deployment.model, number=number)
        services.deployment_rollback(deployment=deployment, to_version=version, user=access.user)
    except ValueError:
        messages.error(request, "Choose the version to roll back to.")
    except APIException as exc:
        messages.error(request, str(exc.detail))
    else:
        messages.success(request, f"Rolling {deployment.name} back to version {number}.")
    return redirect("deployments:detail", deployment_id=deployment.pk)


@login_required
@require_POST
def deployment_stop(request: HttpRequest, deployment_id: int) -> HttpResponse:
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    if not access.is_admin:
        messages.error(request, "Only team admins can stop deployments.")
        return redirect("deployments:detail", deployment_id=deployment.pk)
    services.deployment_stop(deployment=deployment, user=access.user, delete=False)
    messages.success(request, f"Stopping {deployment.name}.")
    return redirect("deployments:detail", deployment_id=deployment.pk)
