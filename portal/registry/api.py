"""REST API for models and versions (``/api/v1/models/...``)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.accounts.access import api_access
from portal.accounts.choices import Role
from portal.core.idempotency import IDEMPOTENCY_PARAMETER, idempotent
from portal.registry import selectors, services
from portal.registry.serializers import (
    ModelCreateSerializer,
    ModelSerializer,
    ModelUpdateSerializer,
    VersionSerializer,
    VersionUploadSerializer,
)

SEARCH = OpenApiParameter("search", str, description="Filter by name or description.")


class ModelListView(APIView):
    """List the team's models, or create one."""

    @extend_schema(parameters=[SEARCH], responses=ModelSerializer(many=True))
    def get(self, request: Request) -> Response:
        access = api_access(request)
        models = selectors.model_list(
            team=access.team, search=request.query_params.get("search", "")
        )
        return Response(ModelSerializer(models, many=True).data)

    @extend_schema(
        request=ModelCreateSerializer,
        responses={201: ModelSerializer},
        parameters=[IDEMPOTENCY_PARAMETER],
    )
    @idempotent
    def post(self, request: Request) -> Response:
        access = api_access(request)
        access.require(Role.MEMBER, "create models")
        data = ModelCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.model_create(team=access.team, user=access.user, **data.validated_data)
        return Response(ModelSerializer(model).data, status=status.HTTP_201_CREATED)


class ModelDetailView(APIView):
    """Read, describe or delete one model."""

    @extend_schema(responses=ModelSerializer)
    def get(self, request: Request, name: str) -> Response:
        model = selectors.model_get(team=api_access(request).team, name=name)
        return Response(ModelSerializer(model).data)

    @extend_schema(
        request=ModelUpdateSerializer, responses=ModelSerializer, parameters=[IDEMPOTENCY_PARAMETER]
    )
    @idempotent
    def patch(self, request: Request, name: str) -> Response:
        access = api_access(request)
        model = selectors.model_get(team=access.team, name=name)
        access.require(Role.MEMBER, "change models")
        data = ModelUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.model_update(model=model, user=access.user, **data.validated_data)
        return Response(ModelSerializer(model).data)

    @extend_schema(responses={204: None}, parameters=[IDEMPOTENCY_PARAMETER])
    @idempotent
    def delete(self, request: Request, name: str) -> Response:
        access = api_access(request)
        model = selectors.model_get(team=access.team, name=name)
        access.require(Role.ADMIN, "delete models")
        services.model_delete(model=model, user=access.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class VersionListView(APIView):
    """List a model's versions, or upload a new one."""

    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(responses=VersionSerializer(many=True))
    def get(self, request: Request, name: str) -> Response:
        model = selectors.model_get(team=api_access(request).team, name=name)
        return Response(VersionSerializer(selectors.version_list(model=model), many=True).data)

    @extend_schema(
        request=VersionUploadSerializer,
        responses={202: VersionSerializer},
        parameters=[IDEMPOTENCY_PARAMETER],
    )
    @idempotent
    def post(self, request: Request, name: str) -> Response:
        access = api_access(request)
        model = selectors.model_get(team=access.team, name=name)
        access.require(Role.MEMBER, "upload versions")
        data = VersionUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields: dict[str, Any] = data.validated_data
        version = services.version_upload(
            model=model,
            file=fields["file"],
            source_format=fields.get("format") or "",
            sample=fields.get("sample_input"),
            options=data.options(),
            user=access.user,
        )
        return Response(VersionSerializer(version).data, status=status.HTTP_202_ACCEPTED)


class VersionDetailView(APIView):
    """One version with its status, signature, report and MLflow links; or delete it."""

    @extend_schema(responses=VersionSerializer)
    def get(self, request: Request, name: str, number: int) -> Response:
        model = selectors.model_get(team=api_access(request).team, name=name)
        version = selectors.version_get(model=model, number=number)
        return Response(VersionSerializer(version).data)

    @extend_schema(responses={204: None}, parameters=[IDEMPOTENCY_PARAMETER])
    @idempotent
    def delete(self, request: Request, name: str, number: int) -> Response:
        """Delete a version (admins); 409 ``version_retained`` while a deployment serves it
        or could roll back to it, 409 ``version_in_progress`` while its pipeline runs."""
        access = api_access(request)
        model = selectors.model_get(team=access.team, name=name)
        version = selectors.version_get(model=model, number=number)
        access.require(Role.ADMIN, "delete versions")
        services.version_delete(version=version, user=access.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
