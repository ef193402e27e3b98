"""Pick the team a signed-in user is working in (kept in the session)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from portal.accounts.selectors import memberships_for_user

SESSION_TEAM_KEY = "modelport_team_id"


class CurrentTeamMiddleware:
    """Sets ``request.team``, ``request.membership`` and ``request.memberships``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.memberships = []  # type: ignore[attr-defined]
        request.membership = None  # type: ignore[attr-defined]
        request.team = None  # type: ignore[attr-defined]
        if request.user.is_authenticated and not request.path.startswith("/api/"):
            memberships = memberships_for_user(user=request.user)
            chosen = request.session.get(SESSION_TEAM_KEY)
            current = next((m for m in memberships if m.team_id == chosen), None)
            if current is None and memberships:
                current = memberships[0]
            request.memberships = memberships  # type: ignore[attr-defined]
            request.membership = current  # type: ignore[attr-defined]
            request.team = current.team if current else None  # type: ignore[attr-defined]
        return self.get_response(request)
