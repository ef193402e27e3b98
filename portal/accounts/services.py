"""Creating teams, memberships and API tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from portal.accounts.choices import Role
from portal.accounts.models import ApiToken, Membership, Team
from portal.accounts.tokens import token_generate
from portal.core.services import event_record

if TYPE_CHECKING:
    from django.contrib.auth.models import User


@transaction.atomic
def team_create(*, slug: str, name: str, admin: User | None = None) -> Team:
    """A new team; ``admin`` becomes its first administrator."""
    team = Team.objects.create(slug=slug, name=name)
    if admin is not None:
        Membership.objects.create(team=team, user=admin, role=Role.ADMIN)
    return team


def membership_set(*, team: Team, user: User, role: str) -> Membership:
    """Give ``user`` a role in ``team`` (adding or changing the membership)."""
    membership, _ = Membership.objects.update_or_create(
        team=team, user=user, defaults={"role": Role(role)}
    )
    return membership


@transaction.atomic
def token_create(*, user: User, team: Team, name: str) -> tuple[ApiToken, str]:
    """A new API token for ``user`` in ``team``; the plain token is returned only here."""
    token, prefix, key_hash = token_generate()
    api_token = ApiToken.objects.create(
        user=user, team=team, name=name.strip() or "token", prefix=prefix, key_hash=key_hash
    )
    event_record(
        team=team, actor=user, step="token", message=f"API token {api_token.name!r} created"
    )
    return api_token, token


@transaction.atomic
def token_revoke(*, token: ApiToken, user: User) -> None:
    """Revoke a token; it stops working at once."""
    updated = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    if updated:
        event_record(
            team=token.team, actor=user, step="token", message=f"API token {token.name!r} revoked"
        )
