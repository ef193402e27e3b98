"""Creating teams, memberships, API tokens and inference keys."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from portal.accounts.choices import Role
from portal.accounts.models import ApiToken, InferenceKey, Invitation, Membership, Team
from portal.accounts.tokens import inference_key_generate, token_generate, token_hash
from portal.core.api import ApiError
from portal.core.choices import EventLevel
from portal.core.services import event_record

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from portal.deployments.models import Deployment


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


def _role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValidationError(
            f"Unknown role {role!r}; choose viewer, member or admin.", code="invalid_role"
        ) from None


@transaction.atomic
def membership_add(*, team: Team, identifier: str, role: str, user: User) -> Membership:
    """Add an existing user, named by user name or e-mail address, to ``team``."""
    wanted = identifier.strip()
    new_role = _role(role)
    if not wanted:
        raise ValidationError("Give the person's user name or e-mail address.", code="required")
    people = list(
        get_user_model()
        .objects.filter(Q(username__iexact=wanted) | Q(email__iexact=wanted), is_active=True)
        .order_by("pk")[:2]
    )
    if not people:
        raise ValidationError(
            f"No active user is called {wanted!r} or has that e-mail address. For someone "
            "without an account, create an invitation link instead.",
            code="unknown_user",
        )
    if len(people) > 1:
        raise ValidationError(
            f"{wanted!r} matches more than one account; use the user name.", code="ambiguous"
        )
    person = people[0]
    try:
        with transaction.atomic():
            membership = Membership.objects.create(team=team, user=person, role=new_role)
    except IntegrityError:
        current = Membership.objects.get(team=team, user=person)
        raise ValidationError(
            f"{person.username} is already a {current.role} of {team.name}; change the role "
            "in the list instead.",
            code="already_member",
        ) from None
    event_record(
        team=team,
        actor=user,
        step="member",
        message=f"{user.username} added {person.username} as {new_role.label.lower()}",
        data={"user": person.username, "role": str(new_role)},
    )
    return membership


def _lock_admins(team: Team) -> int:
    """Lock the team's memberships and count its admins (so two demotions cannot race)."""
    locked = list(Membership.objects.select_for_update().filter(team=team))
    return sum(1 for m in locked if m.role == Role.ADMIN)


@transaction.atomic
def membership_set_role(*, membership: Membership, role: str, user: User) -> Membership:
    """Change a member's role; the team always keeps at least one admin."""
    new_role = _role(role)
    admins = _lock_admins(membership.team)
    membership.refresh_from_db()
    if membership.role == new_role:
        return membership
    if membership.role == Role.ADMIN and admins <= 1:
        raise ValidationError(
            f"{membership.user.username} is the only admin of {membership.team.name}; make "
            "someone else admin first.",
            code="last_admin",
        )
    before = membership.role
    membership.role = new_role
    membership.save(update_fields=["role"])
    event_record(
        team=membership.team,
        actor=user,
        step="member",
        level=EventLevel.WARNING if Role.ADMIN in (before, new_role) else EventLevel.INFO,
        message=f"{user.username} changed {membership.user.username}'s role from {before} "
        f"to {new_role}",
        data={"user": membership.user.username, "from": before, "to": str(new_role)},
    )
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, user: User) -> None:
    """Remove a member from the team and revoke their tokens there; never the last admin."""
    admins = _lock_admins(membership.team)
    if membership.role == Role.ADMIN and admins <= 1:
        raise ValidationError(
            f"{membership.user.username} is the only admin of {membership.team.name}; make "
            "someone else admin first.",
            code="last_admin",
        )
    revoked = ApiToken.objects.filter(
        user=membership.user, team=membership.team, revoked_at__isnull=True
    ).update(revoked_at=timezone.now())
    membership.delete()
    event_record(
        team=membership.team,
        actor=user,
        step="member",
        level=EventLevel.WARNING,
        message=f"{user.username} removed {membership.user.username} from the team"
        + (f" and revoked {revoked} API token(s)" if revoked else ""),
        data={"user": membership.user.username, "tokens_revoked": revoked},
    )


@transaction.atomic
def token_create(
    *, user: User, team: Team, name: str, expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """A new API token for ``user`` in ``team``; the plain token is returned only here."""
    if expires_at is not None and expires_at <= timezone.now():
        raise ApiError("expires_at must be in the future.", code="expiry_in_past")
    token, prefix, key_hash = token_generate()
    api_token = ApiToken.objects.create(
        user=user,
        team=team,
        name=name.strip() or "token",
        prefix=prefix,
        key_hash=key_hash,
        expires_at=expires_at,
    )
    event_record(
        team=team, actor=user, step="token", message=f"API token {api_token.name!r} created"
    )
    return api_token, token


INVITATION_DAYS = 7


@transaction.atomic
def invitation_create(*, team: Team, role: str, user: User) -> tuple[Invitation, str]:
    """A one-time invitation link's key for ``team``; the plain key is returned only here."""
    new_role = _role(role)
    key = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        team=team,
        role=new_role,
        key_hash=token_hash(key),
        created_by=user,
        expires_at=timezone.now() + timedelta(days=INVITATION_DAYS),
    )
    event_record(
        team=team,
        actor=user,
        step="member",
        message=f"{user.username} created an invitation link for a {new_role.label.lower()} "
        f"(valid {INVITATION_DAYS} days, once)",
        data={"invitation": invitation.pk, "role": str(new_role)},
    )
    return invitation, key


def invitation_find(*, key: str) -> Invitation:
    """The open invitation for ``key``; a used, expired or unknown one says which."""
    invitation = Invitation.objects.select_related("team").filter(key_hash=token_hash(key)).first()
    if invitation is None:
        raise ValidationError("This invitation link is not valid.", code="invalid_invitation")
    if invitation.accepted_at is not None:
        raise ValidationError("This invitation link was already used.", code="invitation_used")
    if invitation.expires_at <= timezone.now():
        raise ValidationError(
            "This invitation link has expired; ask a team admin for a new one.",
            code="invitation_expired",
        )
    return invitation


@transaction.atomic
def invitation_accept(*, key: str, user: User) -> Membership:
    """Use an invitation: ``user`` joins its team with its role (once; never a downgrade)."""
    invitation = invitation_find(key=key)
    claimed = Invitation.objects.filter(
        pk=invitation.pk, accepted_at__isnull=True, expires_at__gt=timezone.now()
    ).update(accepted_at=timezone.now(), accepted_by=user)
    if not claimed:
        raise ValidationError("This invitation link was already used.", code="invitation_used")
    membership, created = Membership.objects.get_or_create(
        team=invitation.team, user=user, defaults={"role": invitation.role}
    )
    event_record(
        team=invitation.team,
        actor=user,
        step="member",
        message=f"{user.username} joined with an invitation link as {membership.role}"
        if created
        else f"{user.username} opened an invitation link but was already a {membership.role}",
        data={"invitation": invitation.pk},
    )
    return membership


@transaction.atomic
def account_create_from_invitation(*, key: str, username: str, password: str) -> User:
    """Create an account for someone holding an invitation link, and let them join."""
    from django.contrib.auth.password_validation import validate_password

    invitation_find(key=key)
    name = username.strip()
    model = get_user_model()
    if not name:
        raise ValidationError("Choose a user name.", code="required")
    model._meta.get_field("username").run_validators(name)
    if model.objects.filter(username__iexact=name).exists():
        raise ValidationError(f"The user name {name!r} is taken; choose another.", code="taken")
    candidate = model(username=name)
    validate_password(password, user=candidate)
    person = model.objects.create_user(username=name, password=password)
    invitation_accept(key=key, user=person)
    return person


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


# ---------------------------------------------------------------- inference keys


def _keys_files_write(team: Team) -> None:
    from portal.deployments.inference_keys import team_keys_write

    team_keys_write(team=team)


def key_create(
    *,
    team: Team,
    user: User,
    name: str,
    deployment: Deployment | None = None,
    expires_at: datetime | None = None,
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> tuple[InferenceKey, str]:
    """A new inference key for ``team`` (or one of its deployments); the key is returned
    only here. The deployments' keys files are rewritten before this returns."""
    if deployment is not None and deployment.model.team_id != team.pk:
        raise ApiError("The deployment belongs to another team.", code="wrong_team")
    if expires_at is not None and expires_at <= timezone.now():
        raise ApiError("expires_at must be in the future.", code="expiry_in_past")
    if burst is not None and rate_per_s is None:
        raise ApiError("burst needs rate_per_s (requests per second).", code="burst_needs_rate")
    key, prefix, key_hash = inference_key_generate()
    with transaction.atomic():
        row = InferenceKey.objects.create(
            team=team,
            deployment=deployment,
            name=name.strip()[:80] or "key",
            prefix=prefix,
            key_hash=key_hash,
            expires_at=expires_at,
            rate_per_s=rate_per_s,
            burst=burst,
            created_by=user,
        )
        scope = f"deployment {deployment.model.name}/{deployment.name}" if deployment else "team"
        event_record(
            team=team,
            actor=user,
            deployment=deployment,
            step="key",
            message=f"Inference key {row.name!r} ({prefix}…) created for the {scope}",
        )
    _keys_files_write(team)
    return row, key


def key_revoke(*, key: InferenceKey, user: User) -> bool:
    """Revoke an inference key; instances refuse it within a second (no restart)."""
    with transaction.atomic():
        updated = InferenceKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if updated:
            event_record(
                team=key.team,
                actor=user,
                deployment=key.deployment,
                step="key",
                message=f"Inference key {key.name!r} ({key.prefix}…) revoked",
            )
    _keys_files_write(key.team)
    return bool(updated)
