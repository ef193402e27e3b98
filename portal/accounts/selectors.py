"""Reading teams, memberships and tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db.models import QuerySet
from django.http import Http404

from portal.accounts.models import ApiToken, InferenceKey, Membership, Team

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User


def memberships_for_user(*, user: User | AnonymousUser) -> list[Membership]:
    """The user's memberships, teams loaded, by team name."""
    if not user.is_authenticated:
        return []
    return list(Membership.objects.filter(user=user).select_related("team").order_by("team__name"))


def membership_get(*, user: User | AnonymousUser, team: Team) -> Membership | None:
    """The user's membership in ``team``, or None for an outsider."""
    if not user.is_authenticated:
        return None
    return Membership.objects.filter(user=user, team=team).select_related("team").first()


def tokens_for_user(*, user: User, team: Team) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user, team=team).order_by("-created_at")


def team_members(*, team: Team) -> QuerySet[Membership]:
    """The team's memberships, by user name."""
    return (
        Membership.objects.filter(team=team)
        .select_related("user", "team")
        .order_by("user__username")
    )


def membership_of_team(*, team: Team, membership_id: int) -> Membership:
    """A membership of ``team`` (404 for any other team's, so ids do not leak)."""
    from django.http import Http404

    found = (
        Membership.objects.select_related("user", "team")
        .filter(team=team, pk=membership_id)
        .first()
    )
    if found is None:
        raise Http404("No such member in this team.")
    return found


def team_events(*, team: Team, limit: int = 20) -> QuerySet[Any]:
    """The latest membership changes of the team (its audit trail)."""
    from portal.core.models import Event

    return (
        Event.objects.filter(team=team, step="member")
        .select_related("actor")
        .order_by("-created_at", "-id")[:limit]
    )


def keys_for_team(*, team: Team) -> QuerySet[InferenceKey]:
    """The team's inference keys, newest first, with their deployment."""
    return (
        InferenceKey.objects.filter(team=team)
        .select_related("deployment__model", "created_by")
        .order_by("-created_at", "-id")
    )


def key_get(*, team: Team, key_id: int) -> InferenceKey:
    """The team's key with this id, or 404 (also for other teams' keys)."""
    key = keys_for_team(team=team).filter(pk=key_id).first()
    if key is None:
        raise Http404(f"No inference key {key_id} in team {team.slug}.")
    return key
