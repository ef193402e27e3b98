"""REST API for async inference: the team's callback signing secret."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from deployer.async_dispatch import (
    REQUEST_ID_HEADER,
    SIGNATURE_HEADER,
    STATUS_HEADER,
    TIMESTAMP_HEADER,
)
from portal.accounts.access import api_access
from portal.accounts.choices import Role
from portal.deployments.async_inference import team_callback_secret, team_callback_secret_rotate


class CallbackSecretSerializer(serializers.Serializer[Any]):
    secret = serializers.CharField(help_text="HMAC-SHA256 key of the team's callbacks.")
    signature_header = serializers.CharField()
    timestamp_header = serializers.CharField()
    request_id_header = serializers.CharField()
    status_header = serializers.CharField()
    signed = serializers.CharField(help_text="What the signature covers.")


def _body(secret: str) -> dict[str, str]:
    return {
        "secret": secret,
        "signature_header": SIGNATURE_HEADER,
        "timestamp_header": TIMESTAMP_HEADER,
        "request_id_header": REQUEST_ID_HEADER,
        "status_header": STATUS_HEADER,
        "signed": "v1= + hex HMAC-SHA256(secret, '<timestamp>.<request id>.' + body)",
    }


class CallbackSecretView(APIView):
    """The secret the team's async callbacks are signed with (team admins); POST rotates it."""

    @extend_schema(responses=CallbackSecretSerializer)
    def get(self, request: Request) -> Response:
        access = api_access(request)
        access.require(Role.ADMIN, "read the callback secret")
        return Response(_body(team_callback_secret(team=access.team)))

    @extend_schema(request=None, responses=CallbackSecretSerializer)
    def post(self, request: Request) -> Response:
        access = api_access(request)
        access.require(Role.ADMIN, "rotate the callback secret")
        return Response(_body(team_callback_secret_rotate(team=access.team, user=access.user)))
