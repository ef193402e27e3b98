"""Pages for deployments: status, endpoint, snippets, try-it, logs, metrics, revisions."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from rest_framework.exceptions import APIException

from portal.accounts.access import page_access
from portal.accounts.choices import Role
from portal.core.models import Event
from portal.deployments import replicas, selectors, services
from portal.deployments.async_inference import deployment_async_queue
from portal.deployments.choices import DeploymentStatus, ReplicaState
from portal.deployments.inference_keys import portal_headers
from portal.deployments.models import MAX_REPLICAS, Deployment
from portal.deployments.tryit import input_fields, try_inference
from portal.monitoring.charts import chart
from portal.monitoring.selectors import deployment_series
from portal.registry import selectors as registry_selectors
from portal.registry.models import ModelVersion

LOG_LINES = 200


@login_required
def deployment_list(request: HttpRequest) -> HttpResponse:
    access = page_access(request)
    deployments = selectors.deployment_list(team=access.team)
    return render(request, "deployments/list.html", {"deployments": deployments})


def _example_tensors(version: ModelVersion | None) -> list[dict[str, Any]]:
    tensors = []
    for spec in version.signature.get("inputs", []) if version else []:
        shape = [1 if d < 0 else d for d in spec["shape"]]
        count = 1
        for dim in shape:
            count *= dim
        value: object = "text" if spec["datatype"] == "BYTES" else 0
        tensors.append(
            {
                "name": spec["name"],
                "shape": shape,
                "datatype": spec["datatype"],
                "data": [value] * min(count, 8) + (["..."] if count > 8 else []),
                "numpy_dtype": {"FP32": "np.float32", "FP64": "np.float64", "FP16": "np.float16",
                                "INT64": "np.int64", "INT32": "np.int32", "BOOL": "np.bool_",
                                "BYTES": "np.object_"}.get(spec["datatype"], "np.float32"),
            }
        )  # fmt: skip
    return tensors


def snippets(deployment: Deployment, version: ModelVersion | None) -> dict[str, str]:
    """Copyable curl, tritonclient and modelport snippets filled in for this deployment."""
    url = deployment.endpoint_url
    name = deployment.model.name
    base = url.rsplit("/v2/models/", 1)[0]
    host = base.split("://", 1)[-1]
    tensors = _example_tensors(version)
    body = json.dumps(
        {"inputs": [{k: t[k] for k in ("name", "shape", "datatype", "data")} for t in tensors]}
    )
    private = not deployment.public
    auth = '  -H "Authorization: Bearer $MODELPORT_KEY" \\\n' if private else ""
    curl = (
        ("export MODELPORT_KEY=mpk_…   # Inference keys page\n" if private else "")
        + f"curl -s -X POST {url}/infer \\\n{auth}  -H 'Content-Type: application/json' \\\n"
        f"  -d '{body}'"
    )
    outputs = [spec["name"] for spec in version.signature.get("outputs", [])] if version else []
    http = _tritonclient("http", host, name, tensors, outputs, "Authorization" if private else "")
    grpc = _tritonclient(
        "grpc",
        deployment.grpc_address or "HOST:8001",
        name,
        tensors,
        outputs,
        # grpcio refuses upper-case metadata keys on the client side.
        "authorization" if private else "",
    )
    modelport = (
        "export MODELPORT_URL=… MODELPORT_TOKEN=…   # API tokens page\n"
        f"modelport keys create --name my-app --deployment {deployment.pk}  # shown once\n"
        f"modelport push model.onnx --model {name} --deploy {deployment.name}\n"
        f"modelport status --model {name}\n"
        f"modelport rollback --model {name} --deployment {deployment.name} --to-version N --wait"
    )
    return {
        "curl": curl,
        "tritonclient": http,
        "tritonclient_grpc": grpc,
        "modelport": modelport,
    }


def _tritonclient(
    protocol: str,
    address: str,
    model: str,
    tensors: list[dict[str, Any]],
    outputs: list[str],
    header: str,
) -> str:
    """A tritonclient (``http`` or ``grpc``) snippet; ``header`` names the key's header
    (empty for a public deployment)."""
    module = f"{protocol}client"
    lines = [
        *(["import os", ""] if header else []),
        "import numpy as np",
        f"import tritonclient.{protocol} as {module}",
        "",
        f'client = {module}.InferenceServerClient("{address}")',
    ]
    if header:
        lines.append(f'headers = {{"{header}": f"Bearer {{os.environ[\'MODELPORT_KEY\']}}"}}')
    lines.append("inputs = []")
    for tensor in tensors:
        lines += [
            f"x = np.zeros({tuple(tensor['shape'])!r}, dtype={tensor['numpy_dtype']})",
            f'tensor = {module}.InferInput("{tensor["name"]}", list(x.shape), '
            f'"{tensor["datatype"]}")',
            "tensor.set_data_from_numpy(x)",
            "inputs.append(tensor)",
        ]
    lines.append(f'result = client.infer("{model}", inputs{", headers=headers" if header else ""})')
    lines += [f'print(result.as_numpy("{output}"))' for output in outputs]
    return "\n".join(lines)


def _charts(deployment: Deployment) -> list[Any]:
    points = deployment_series(deployment=deployment)
    return [
        chart(points, "Requests", "req/s", "requests_per_s"),
        chart(points, "Errors", "err/s", "errors_per_s"),
        chart(points, "Latency p50 / p99", "ms", "p50_ms", "p99_ms"),
        chart(points, "Replicas", "replicas", "replicas"),
    ]


@login_required
def deployment_detail(request: HttpRequest, deployment_id: int) -> HttpResponse:
    """The deployment page; htmx asks for one part of it with ``?part=``."""
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    live = deployment.status in (
        DeploymentStatus.RUNNING,
        DeploymentStatus.DEGRADED,
        DeploymentStatus.DEPLOYING,
    )
    part = request.GET.get("part", "") if getattr(request, "htmx", False) else ""
    replicas_context = _replicas_context(deployment, access.can_change)
    if part == "replicas":
        return render(request, "deployments/htmx/replicas.html", {**replicas_context, "oob": True})
    if part == "logs":
        revision, lines = selectors.deployment_log_lines(deployment=deployment, tail=LOG_LINES)
        return render(
            request,
            "deployments/htmx/logs.html",
            {"deployment": deployment, "log_revision": revision, "log_lines": lines, "live": live},
        )
    if part == "metrics":
        return render(
            request,
            "deployments/htmx/metrics.html",
            {"deployment": deployment, "charts": _charts(deployment), "live": live},
        )
    if part == "async":
        return render(
            request,
            "deployments/htmx/async_queue.html",
            {
                "deployment": deployment,
                "async_queue": deployment_async_queue(deployment=deployment),
                "live": live,
            },
        )
    revisions = list(selectors.revision_list(deployment=deployment))
    current = deployment.current_revision
    events = (
        Event.objects.filter(deployment=deployment)
        .select_related("actor")
        .order_by("-created_at", "-id")[:50]
    )
    rollback_targets = selectors.deployment_rollback_targets(deployment=deployment)
    version = current.version if current else None
    context = {
        "deployment": deployment,
        "revisions": revisions,
        "events": events,
        "access": access,
        "snippets": snippets(deployment, version) if deployment.endpoint_url else None,
        "rollback_targets": rollback_targets,
        "try_fields": input_fields(version.signature) if version else [],
        "live": live,
        "async_queue": deployment_async_queue(deployment=deployment),
        **replicas_context,
    }
    if part == "status":
        response = render(request, "deployments/htmx/status.html", context)
        was = request.GET.get("was", "")
        if deployment.is_final and was and was != deployment.status:
            # The rollout just ended: reload once so the snippets, try-it form and
            # charts describe what is serving now.
            response["HX-Refresh"] = "true"
        return response
    revision, lines = selectors.deployment_log_lines(deployment=deployment, tail=LOG_LINES)
    context.update(log_revision=revision, log_lines=lines, charts=_charts(deployment))
    return render(request, "deployments/detail.html", context)


def _replicas_context(deployment: Deployment, can_scale: bool) -> dict[str, Any]:
    rows = selectors.replica_list(deployment=deployment)
    return {
        "deployment": deployment,
        "replicas": rows,
        "ready_count": sum(1 for r in rows if r.state == ReplicaState.READY),
        "serving": deployment.status not in (DeploymentStatus.STOPPED, DeploymentStatus.FAILED),
        "can_scale": can_scale and deployment.status != DeploymentStatus.STOPPED,
        "max_allowed": MAX_REPLICAS,
    }


@login_required
@require_POST
def deployment_scale(request: HttpRequest, deployment_id: int) -> HttpResponse:
    """Set the replica range from the deployment page (members)."""
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    access.require_page(Role.MEMBER, "change the replicas of deployments")
    try:
        low = int(request.POST.get("min_replicas", ""))
        high = int(request.POST.get("max_replicas", "") or low)
        target = float(request.POST.get("autoscale_target_inflight", "") or 0)
        cooldown = int(request.POST.get("autoscale_cooldown_s", "") or 60)
        changed = replicas.deployment_scale(
            deployment=deployment,
            min_replicas=low,
            max_replicas=high,
            user=access.user,
            target_inflight=target,
            cooldown_s=cooldown,
        )
    except ValueError:
        messages.error(request, "Replicas, target and cooldown must be numbers.")
    except APIException as exc:
        messages.error(request, str(exc.detail))
    else:
        if changed:
            messages.success(request, f"{deployment.name} runs {low} replica(s) (up to {high}).")
    return redirect("deployments:detail", deployment_id=deployment.pk)


@login_required
@require_POST
def deployment_try(request: HttpRequest, deployment_id: int) -> HttpResponse:
    """Send the try-it form's inputs to the live endpoint and show the answer."""
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    current = deployment.current_revision
    if current is None or not deployment.endpoint_url:
        result = None
        error = "The deployment is not serving anything yet."
    else:
        values = {
            key.removeprefix("input-"): request.POST.get(key, "")
            for key in request.POST
            if key.startswith("input-")
        }
        result = try_inference(
            endpoint_url=_reachable_from_here(deployment.endpoint_url),
            headers=portal_headers(deployment.pk),
            signature=current.version.signature,
            values=values,
            upload=request.FILES.get("sample"),
        )
        error = ""
    return render(request, "deployments/htmx/try_result.html", {"result": result, "error": error})


def _reachable_from_here(url: str) -> str:
    """The endpoint as this process reaches it: behind compose, the proxy's public address
    is not the one the web container can call (MODELPORT_PROXY_CHECK_URL is)."""
    public, internal = settings.MODELPORT_PROXY_URL, settings.MODELPORT_PROXY_CHECK_URL
    if public and internal and public != internal and url.startswith(public):
        return internal + url[len(public) :]
    return url


@login_required
@require_POST
def deployment_rollback(request: HttpRequest, deployment_id: int) -> HttpResponse:
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    access.require_page(Role.ADMIN, "roll back deployments")
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
    access.require_page(Role.ADMIN, "stop deployments")
    services.deployment_stop(deployment=deployment, user=access.user, delete=False)
    messages.success(request, f"Stopping {deployment.name}.")
    return redirect("deployments:detail", deployment_id=deployment.pk)


@login_required
@require_POST
def deployment_public(request: HttpRequest, deployment_id: int) -> HttpResponse:
    """Make a deployment public (no key needed) or private again (team admins)."""
    access = page_access(request)
    deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
    access.require_page(Role.ADMIN, "make deployments public or private")
    public = request.POST.get("public", "") == "true"
    services.deployment_public_set(deployment=deployment, public=public, user=access.user)
    messages.success(
        request,
        f"{deployment.name} is public: calls need no key."
        if public
        else f"{deployment.name} is private: calls need an inference key.",
    )
    return redirect("deployments:detail", deployment_id=deployment.pk)
