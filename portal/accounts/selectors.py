"""Reading teams, memberships and tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db.models import QuerySet

from portal.accounts.models import ApiToken, Membership, Team

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
