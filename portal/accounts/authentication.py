"""DRF authentication with hashed, team-scoped, revocable API tokens."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from portal.accounts.models import ApiToken, Membership
from portal.accounts.tokens import token_hash

# last_used_at is written at most this often per token, not on every request.
_TOUCH_EVERY = timedelta(minutes=1)


class ApiTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Token <token>`` (or ``Bearer <token>``)."""

    keywords = ("token", "bearer")

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower().decode("latin-1") not in self.keywords:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: use 'Token <token>'.", code="invalid_token"
            )
        try:
            raw = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(
                "The token holds characters a token never has.", code="invalid_token"
            ) from None
        token = (
            ApiToken.objects.select_related("user", "team").filter(key_hash=token_hash(raw)).first()
        )
        if token is None or token.revoked_at is not None or not token.user.is_active:
            raise exceptions.AuthenticationFailed(
                "The token is unknown or has been revoked. Create a new one on the API tokens "
                "page or with 'manage.py token_create'.",
                code="invalid_token",
            )
        if not Membership.objects.filter(user=token.user, team=token.team).exists():
            raise exceptions.AuthenticationFailed(
                "The token's user is no longer a member of its team.", code="invalid_token"
            )
        now = timezone.now()
        if token.expires_at is not None and token.expires_at <= now:
            raise exceptions.AuthenticationFailed(
                f"The token expired at {token.expires_at:%Y-%m-%d %H:%M} UTC. Create a new one "
                "on the API tokens page.",
                code="token_expired",
            )
        if token.last_used_at is None or now - token.last_used_at > _TOUCH_EVERY:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return "Token"
