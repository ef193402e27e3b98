"""API rate limits (DRF throttles); the rates are settings (``MODELPORT_*_RATE``)."""

from __future__ import annotations

from rest_framework.throttling import ScopedRateThrottle, SimpleRateThrottle


class CredentialCreateThrottle(SimpleRateThrottle):
    """Creating API tokens or inference keys, per user (the ``credentials`` rate)."""

    scope = "credentials"

    def get_cache_key(self, request: object, view: object) -> str | None:
        user = getattr(request, "user", None)
        ident = user.pk if user is not None and user.is_authenticated else self.get_ident(request)  # type: ignore[arg-type]
        return self.cache_format % {"scope": self.scope, "ident": ident}


__all__ = ["CredentialCreateThrottle", "ScopedRateThrottle"]
