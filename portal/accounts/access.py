"""Who may do what in which team, for pages and the API alike.

Outsiders never learn that a team's objects exist: every lookup is scoped to a
team the caller belongs to, so they get 404. Members who lack the role get 403.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest
from rest_framework import exceptions
from rest_framework.request import Request

from portal.accounts.choices import Role
from portal.accounts.models import ApiToken, Membership, Team
from portal.accounts.selectors import memberships_for_user
from portal.core.api import ApiError

TEAM_HEADER = "HTTP_X_MODELPORT_TEAM"


@dataclass(frozen=True)
class Access:
    """A caller's membership in the team a request works on."""

    membership: Membership

    @property
    def team(self) -> Team:
        return self.membership.team

    @property
    def user(self) -> User:
        return self.membership.user

    @property
    def can_change(self) -> bool:
        return self.membership.allows(Role.MEMBER)

    @property
    def is_admin(self) -> bool:
        return self.membership.allows(Role.ADMIN)

    def denial(self, role: str, action: str) -> str:
        """Why this caller may not do ``action``, or "" when they may."""
        if self.membership.allows(role):
            return ""
        return (
            f"Only team {Role(role).label.lower()}s can {action}; you are a "
            f"{Role(self.membership.role).label.lower()} of {self.team.slug}."
        )

    def require(self, role: str, action: str) -> None:
        """API: raise 403 naming the role needed for ``action``."""
        if reason := self.denial(role, action):
            raise exceptions.PermissionDenied(reason, code="forbidden")

    def require_page(self, role: str, action: str) -> None:
        """Pages: raise Django's 403 (rendered by templates/403.html) with the reason."""
        if reason := self.denial(role, action):
            raise DjangoPermissionDenied(reason)


def api_access(request: Request) -> Access:
    """The caller's access for an API request.

    A token works only in its own team. A browser session names the team with the
    ``X-ModelPort-Team`` header or ``?team=``; a user of several teams who names none
    gets 400 ``team_required``, never an answer from whichever team comes first.
    """
    if isinstance(request.auth, ApiToken):
        membership = (
            Membership.objects.select_related("team", "user")
            .filter(user=request.auth.user, team=request.auth.team)
            .first()
        )
        if membership is None:
            raise exceptions.NotFound("Not found.")
        return Access(membership)
    wanted = request.META.get(TEAM_HEADER) or request.query_params.get("team")
    memberships = memberships_for_user(user=request.user)
    if wanted:
        memberships = [m for m in memberships if m.team.slug == wanted]
    elif len(memberships) > 1:
        raise ApiError(
            "You are a member of several teams: name the team with the X-ModelPort-Team "
            f"header (or ?team=): one of {', '.join(m.team.slug for m in memberships)}.",
            code="team_required",
        )
    if not memberships:
        raise exceptions.NotFound(
            "No team found. Ask a team admin to add you, or check the team name."
        )
    return Access(memberships[0])


def page_access(request: HttpRequest) -> Access:
    """The signed-in user's access in the team chosen in the session."""
    membership = getattr(request, "membership", None)
    if membership is None:
        raise Http404("You are not a member of any team yet.")
    return Access(membership)
