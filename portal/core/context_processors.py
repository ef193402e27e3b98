"""Template context every page needs: the current team and the user's teams."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest


def portal(request: HttpRequest) -> dict[str, Any]:
    return {
        "current_team": getattr(request, "team", None),
        "current_membership": getattr(request, "membership", None),
        "user_memberships": getattr(request, "memberships", []),
        "mlflow_ui_url": settings.MLFLOW_UI_URL,
        "public_url": settings.PUBLIC_URL,
    }
