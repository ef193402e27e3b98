"""REST API for deploying, listing, rolling back and deleting deployments."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponseBase, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.accounts.access import api_access
from portal.accounts.choices import Role
from portal.core.api import ApiError
from portal.core.idempotency import IDEMPOTENCY_PARAMETER, idempotent
from portal.deployments import replicas, selectors, services
from portal.deployments.models import Deployment, Revision
from portal.deployments.serializers import (
    DeploymentSerializer,
    DeploymentUpdateSerializer,
    DeployRequestSerializer,
    DeployResponseSerializer,
    LogsSerializer,
    RevisionSerializer,
    RollbackRequestSerializer,
)
from portal.registry import selectors as registry_selectors


def _accepted(revision_id: int, deployment_id: int) -> Response:
    revision = Revision.objects.select_related("version", "requested_by").get(pk=revision_id)
    deployment = Deployment.objects.select_related("model", "current_revision__version").get(
        pk=deployment_id
    )
    body = {
        "deployment": DeploymentSerializer(deployment).data,
        "revision": RevisionSerializer(revision).data,
    }
    return Response(body, status=status.HTTP_202_ACCEPTED)


class DeployView(APIView):
    """Deploy a ready version to a named deployment of its model."""

    @extend_schema(
        request=DeployRequestSerializer,
        responses={202: DeployResponseSerializer},
        parameters=[IDEMPOTENCY_PARAMETER],
    )
    @idempotent
    def post(self, request: Request, name: str, number: int) -> Response:
        access = api_access(request)
        model = registry_selectors.model_get(team=access.team, name=name)
        version = registry_selectors.version_get(model=model, number=number)
        access.require(Role.MEMBER, "deploy")
        data = DeployRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        revision = services.deployment_deploy(
            version=version,
            name=fields["deployment"],
            device=fields["device"],
            cpus=fields.get("cpus"),
            memory_mb=fields.get("memory_mb"),
            min_replicas=fields.get("min_replicas"),
            max_replicas=fields.get("max_replicas"),
            gpu_count=fields.get("gpu_count"),
            gpu_ids=fields.get("gpu_ids"),
            user=access.user,
        )
        return _accepted(revision.pk, revision.deployment_id)


class DeploymentListView(APIView):
    """The team's deployments."""

    @extend_schema(
        parameters=[OpenApiParameter("model", str, description="Only this model's deployments.")],
        responses=DeploymentSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        team = api_access(request).team
        model_name = request.query_params.get("model")
        if model_name is not None and "\x00" in model_name:
            raise ApiError("model: a model name cannot contain NUL bytes.", code="invalid")
        model = registry_selectors.model_get(team=team, name=model_name) if model_name else None
        deployments = selectors.deployment_list(team=team, model=model)
        return Response(DeploymentSerializer(deployments, many=True).data)


class DeploymentDetailView(APIView):
    """One deployment; PATCH sets ``public`` or the replica range; DELETE stops and removes it."""

    @extend_schema(responses=DeploymentSerializer)
    def get(self, request: Request, deployment_id: int) -> Response:
        deployment = selectors.deployment_get(
            team=api_access(request).team, deployment_id=deployment_id
        )
        return Response(DeploymentSerializer(deployment).data)

    @extend_schema(request=DeploymentUpdateSerializer, responses=DeploymentSerializer)
    def patch(self, request: Request, deployment_id: int) -> Response:
        """Make the deployment public or private (team admins), or change its replica
        range (members)."""
        access = api_access(request)
        deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
        data = DeploymentUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        if "public" in fields:
            access.require(Role.ADMIN, "make deployments public or private")
        scaling = (
            "min_replicas",
            "max_replicas",
            "autoscale_target_inflight",
            "autoscale_cooldown_s",
        )
        if any(name in fields for name in scaling):
            access.require(Role.MEMBER, "change the replicas of deployments")
            autoscale = (
                {"target_inflight": fields["autoscale_target_inflight"]}
                if "autoscale_target_inflight" in fields
                else {}
            )
            replicas.deployment_scale(
                deployment=deployment,
                min_replicas=fields.get("min_replicas"),
                max_replicas=fields.get("max_replicas"),
                cooldown_s=fields.get("autoscale_cooldown_s"),
                user=access.user,
                **autoscale,
            )
        if "public" in fields:
            services.deployment_public_set(
                deployment=deployment, public=fields["public"], user=access.user
            )
        deployment.refresh_from_db()
        return Response(DeploymentSerializer(deployment).data)

    @extend_schema(responses={202: DeploymentSerializer}, parameters=[IDEMPOTENCY_PARAMETER])
    @idempotent
    def delete(self, request: Request, deployment_id: int) -> Response:
        access = api_access(request)
        deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
        access.require(Role.ADMIN, "delete deployments")
        services.deployment_stop(deployment=deployment, user=access.user, delete=True)
        deployment.refresh_from_db()
        return Response(DeploymentSerializer(deployment).data, status=status.HTTP_202_ACCEPTED)


class RevisionListView(APIView):
    """Which versions a deployment ran, from when to when, who asked, and the outcome."""

    @extend_schema(responses=RevisionSerializer(many=True))
    def get(self, request: Request, deployment_id: int) -> Response:
        deployment = selectors.deployment_get(
            team=api_access(request).team, deployment_id=deployment_id
        )
        revisions = selectors.revision_list(deployment=deployment)
        return Response(RevisionSerializer(revisions, many=True).data)


class RollbackView(APIView):
    """Return a deployment to an earlier version, without a rebuild (team admins only)."""

    @extend_schema(
        request=RollbackRequestSerializer,
        responses={202: DeployResponseSerializer},
        parameters=[IDEMPOTENCY_PARAMETER],
    )
    @idempotent
    def post(self, request: Request, deployment_id: int) -> Response:
        access = api_access(request)
        deployment = selectors.deployment_get(team=access.team, deployment_id=deployment_id)
        access.require(Role.ADMIN, "roll back deployments")
        data = RollbackRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        version = registry_selectors.version_get(
            model=deployment.model, number=data.validated_data["version"]
        )
        revision = services.deployment_rollback(
            deployment=deployment, to_version=version, user=access.user
        )
        return _accepted(revision.pk, deployment.pk)


class DeploymentLogsView(APIView):
    """The last lines the deployment's live instance wrote; with ``follow``, a stream."""

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # ``Accept: text/plain`` (a follower's) gets JSON when not following, not a 406.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        parameters=[
            OpenApiParameter("tail", int, description="Number of lines (default 200)."),
            OpenApiParameter(
                "follow",
                bool,
                description="Stream the lines as text/plain, then every new line while the "
                "deployment runs (at most MODELPORT_LOG_FOLLOW_MAX_S, or `seconds`).",
            ),
            OpenApiParameter("seconds", int, description="With follow: stop after this long."),
        ],
        responses={
            (200, "application/json"): LogsSerializer,
            (200, "text/plain"): OpenApiResponse(
                OpenApiTypes.STR, description="With follow=true: the lines as they come."
            ),
        },
    )
    def get(self, request: Request, deployment_id: int) -> HttpResponseBase:
        deployment = selectors.deployment_get(
            team=api_access(request).team, deployment_id=deployment_id
        )
        tail = _int_param(request, "tail", 200, 1, 5000)
        if request.query_params.get("follow", "").lower() in ("1", "true", "yes"):
            limit = settings.MODELPORT_LOG_FOLLOW_MAX_S
            seconds = _int_param(request, "seconds", limit, 1, limit)
            # Under ASGI (the web server) the stream waits on the event loop and holds no
            # thread; under WSGI (tests, runserver) it holds its thread, as WSGI must.
            stream = (
                selectors.deployment_log_stream_async
                if isinstance(request._request, ASGIRequest)
                else selectors.deployment_log_stream
            )
            response = StreamingHttpResponse(
                stream(deployment=deployment, tail=tail, seconds=seconds),
                content_type="text/plain; charset=utf-8",
            )
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold lines back
            return response
        revision, lines = selectors.deployment_log_lines(deployment=deployment, tail=tail)
        return Response({"revision": revision.pk if revision else None, "lines": lines})


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(int(request.query_params.get(name, default)), high))
    except ValueError:
        return default
