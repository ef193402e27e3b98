"""REST API for inference keys (``/api/v1/keys/``)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle
from rest_framework.views import APIView

from portal.accounts import selectors, services
from portal.accounts.access import api_access
from portal.accounts.choices import Role
from portal.accounts.serializers import KeyCreatedSerializer, KeyCreateSerializer, KeySerializer
from portal.accounts.throttles import CredentialCreateThrottle


class KeyListView(APIView):
    """The team's inference keys; POST creates one (the key is in this answer only)."""

    def get_throttles(self) -> list[BaseThrottle]:
        throttles = super().get_throttles()
        if self.request.method == "POST":
            throttles.append(CredentialCreateThrottle())
        return throttles

    @extend_schema(responses=KeySerializer(many=True))
    def get(self, request: Request) -> Response:
        keys = selectors.keys_for_team(team=api_access(request).team)
        return Response(KeySerializer(keys, many=True).data)

    # Not @idempotent: a replay would have to store the key itself to answer again.
    @extend_schema(request=KeyCreateSerializer, responses={201: KeyCreatedSerializer})
    def post(self, request: Request) -> Response:
        from portal.deployments.selectors import deployment_get

        access = api_access(request)
        access.require(Role.MEMBER, "create inference keys")
        data = KeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        deployment = None
        if fields.get("deployment"):
            deployment = deployment_get(team=access.team, deployment_id=fields["deployment"])
        row, key = services.key_create(
            team=access.team,
            user=access.user,
            name=fields["name"],
            deployment=deployment,
            expires_at=fields.get("expires_at"),
            rate_per_s=fields.get("rate_per_s"),
            burst=fields.get("burst"),
        )
        body = KeyCreatedSerializer(row).data
        body["key"] = key
        return Response(body, status=status.HTTP_201_CREATED)


class KeyDetailView(APIView):
    """One inference key; DELETE revokes it (instances refuse it within a second)."""

    @extend_schema(responses=KeySerializer)
    def get(self, request: Request, key_id: int) -> Response:
        key = selectors.key_get(team=api_access(request).team, key_id=key_id)
        return Response(KeySerializer(key).data)

    # The revoked key comes back (200), so say so: a bare serializer reads as 204 for DELETE.
    @extend_schema(responses={200: KeySerializer})
    def delete(self, request: Request, key_id: int) -> Response:
        access = api_access(request)
        key = selectors.key_get(team=access.team, key_id=key_id)
        access.require(Role.MEMBER, "revoke inference keys")
        services.key_revoke(key=key, user=access.user)
        key.refresh_from_db()
        return Response(KeySerializer(key).data)
