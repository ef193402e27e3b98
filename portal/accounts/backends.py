"""Sign-in lockout (django-axes) for web sign-ins only."""

from __future__ import annotations

from typing import Any

from axes.backends import AxesStandaloneBackend
from django.http import HttpRequest


class SignInLockoutBackend(AxesStandaloneBackend):
    """django-axes' check, skipped when there is no request to count against.

    Only a web sign-in has an address and a user name to lock; ``authenticate()``
    without a request (management commands, the test client) has nothing to count.
    """

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)
