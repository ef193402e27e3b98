"""Sign-in, team switching, the Team page (members and roles), the API tokens page and the
inference keys page."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect
from rest_framework.exceptions import APIException

from portal.accounts import selectors, services
from portal.accounts.access import Access, page_access
from portal.accounts.choices import Role
from portal.accounts.middleware import SESSION_TEAM_KEY
from portal.accounts.models import ApiToken, Membership
from portal.accounts.throttles import CredentialCreateThrottle


class LoginView(auth_views.LoginView):
    template_name = "accounts/login.html"
    redirect_authenticated_user = True


@require_POST
@login_required
def team_switch(request: HttpRequest) -> HttpResponse:
    """Work in another of the user's teams."""
    wanted = request.POST.get("team", "")
    membership = next((m for m in request.memberships if m.team.slug == wanted), None)  # type: ignore[attr-defined]
    if membership is not None:
        request.session[SESSION_TEAM_KEY] = membership.team_id
    return redirect("registry:model_list")


@login_required
@require_http_methods(["GET", "POST"])
def token_list(request: HttpRequest) -> HttpResponse:
    """List the user's tokens in the current team and create new ones (shown once)."""
    access = page_access(request)
    new_token = None
    if request.method == "POST":
        if (refused := _throttled(request, "tokens")) is not None:
            return refused
        name = request.POST.get("name", "").strip()[:80]
        problem, expires_at = "", None
        try:
            expires_at = _expiry_from_days(request.POST.get("expires_days", ""))
        except FormProblem as exc:
            problem = str(exc)
        if not name:
            problem = "Give the token a name, for example the pipeline that uses it."
        if problem:
            messages.error(request, problem)
        else:
            _, new_token = services.token_create(
                user=access.user, team=access.team, name=name, expires_at=expires_at
            )
    tokens = selectors.tokens_for_user(user=access.user, team=access.team)
    return render(request, "accounts/tokens.html", {"tokens": tokens, "new_token": new_token})


@require_POST
@login_required
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    access = page_access(request)
    token = get_object_or_404(ApiToken, pk=token_id, user=access.user)
    services.token_revoke(token=token, user=access.user)
    messages.success(request, f"Token {token.name!r} revoked.")
    return redirect("accounts:tokens")


def _members_response(
    request: HttpRequest, access: Access, error: str = "", invite_link: str = ""
) -> HttpResponse:
    """The Team page, or only its members section for htmx (with the error, if any)."""
    context = {
        "members": selectors.team_members(team=access.team),
        "audit": selectors.team_events(team=access.team),
        "is_admin": access.is_admin,
        "roles": Role.choices,
        "error": error,
        "invite_link": invite_link,
    }
    template = "accounts/htmx/members.html" if request.htmx else "accounts/team.html"  # type: ignore[attr-defined]
    # htmx swaps only 2xx answers: a refused change comes back as 200 with the error shown.
    return render(request, template, context)


def _after_change(request: HttpRequest, access: Access, done: str, error: str) -> HttpResponse:
    if request.htmx:  # type: ignore[attr-defined]
        return _members_response(request, access, error)
    if error:
        messages.error(request, error)
    else:
        messages.success(request, done)
    return redirect("accounts:team")


@login_required
@require_http_methods(["GET", "POST"])
def team_page(request: HttpRequest) -> HttpResponse:
    """The current team's members and roles; admins add people here."""
    access = page_access(request)
    if request.method == "GET":
        return _members_response(request, access)
    access.require_page(Role.ADMIN, "add members")
    identifier = request.POST.get("identifier", "")[:254]
    error = done = ""
    try:
        membership = services.membership_add(
            team=access.team,
            identifier=identifier,
            role=request.POST.get("role", Role.MEMBER),
            user=access.user,
        )
        done = f"{membership.user.username} added as {membership.role}."
    except ValidationError as exc:
        error = " ".join(exc.messages)
    return _after_change(request, access, done, error)


@require_POST
@login_required
def member_role(request: HttpRequest, membership_id: int) -> HttpResponse:
    access = page_access(request)
    membership = selectors.membership_of_team(team=access.team, membership_id=membership_id)
    access.require_page(Role.ADMIN, "change roles")
    error = ""
    try:
        services.membership_set_role(
            membership=membership, role=request.POST.get("role", ""), user=access.user
        )
    except ValidationError as exc:
        error = " ".join(exc.messages)
    return _after_change(
        request, access, f"{membership.user.username} is now {membership.role}.", error
    )


@require_POST
@login_required
def member_remove(request: HttpRequest, membership_id: int) -> HttpResponse:
    access = page_access(request)
    membership = selectors.membership_of_team(team=access.team, membership_id=membership_id)
    access.require_page(Role.ADMIN, "remove members")
    error = ""
    try:
        services.membership_remove(membership=membership, user=access.user)
    except ValidationError as exc:
        error = " ".join(exc.messages)
    done = f"{membership.user.username} removed from {access.team.name}."
    if not error and membership.user_id == access.user.pk:
        # They left the team: nothing of it is theirs to see any more.
        if request.htmx:  # type: ignore[attr-defined]
            return HttpResponseClientRedirect(reverse("registry:model_list"))
        return redirect("registry:model_list")
    return _after_change(request, access, done, error)


@require_POST
@login_required
def invitation_create(request: HttpRequest) -> HttpResponse:
    """Admins: a one-time link that lets its holder join (with an account made on the way)."""
    access = page_access(request)
    access.require_page(Role.ADMIN, "invite people")
    try:
        _, key = services.invitation_create(
            team=access.team, role=request.POST.get("role", Role.MEMBER), user=access.user
        )
    except ValidationError as exc:
        return _after_change(request, access, "", " ".join(exc.messages))
    link = request.build_absolute_uri(reverse("accounts:invitation", args=[key]))
    if request.htmx:  # type: ignore[attr-defined]
        return _members_response(request, access, invite_link=link)
    messages.success(request, f"Invitation link (shown once, valid 7 days, for one person): {link}")
    return redirect("accounts:team")


@require_http_methods(["GET", "POST"])
def invitation_page(request: HttpRequest, key: str) -> HttpResponse:
    """Open an invitation: join when signed in, or create an account and join."""
    error = ""
    try:
        invitation = services.invitation_find(key=key)
    except ValidationError as exc:
        return render(
            request, "accounts/invitation.html", {"invalid": " ".join(exc.messages)}, status=410
        )
    if request.method == "POST":
        try:
            if request.user.is_authenticated:
                membership = services.invitation_accept(key=key, user=request.user)
            else:
                person = services.account_create_from_invitation(
                    key=key,
                    username=request.POST.get("username", "")[:150],
                    password=request.POST.get("password", ""),
                )
                login(request, person, backend="django.contrib.auth.backends.ModelBackend")
                membership = Membership.objects.get(team=invitation.team, user=person)
        except ValidationError as exc:
            error = " ".join(exc.messages)
        else:
            request.session[SESSION_TEAM_KEY] = membership.team_id
            messages.success(request, f"You are now a {membership.role} of {membership.team.name}.")
            return redirect("registry:model_list")
    context = {
        "invitation": invitation,
        "error": error,
        "username": request.POST.get("username", ""),
    }
    return render(request, "accounts/invitation.html", context, status=400 if error else 200)


# ---------------------------------------------------------------- inference keys


def _throttled(request: HttpRequest, what: str) -> HttpResponse | None:
    """429 with Retry-After when this user created too many credentials lately."""
    throttle = CredentialCreateThrottle()
    if throttle.allow_request(request, None):  # type: ignore[arg-type]
        return None
    wait = max(1, int(throttle.wait() or 1))
    return HttpResponse(
        f"Too many {what} created lately: try again in {wait} s.",
        status=429,
        headers={"Retry-After": str(wait)},
    )


class FormProblem(ValueError):
    """A form value that cannot be used, with a sentence saying why."""


def _expiry_from_days(text: str) -> datetime | None:
    try:
        days = int(text) if text.strip() else 0
    except ValueError:
        raise FormProblem("Expiry must be a whole number of days.") from None
    if days < 0 or days > 3650:
        raise FormProblem("Expiry must be 1 to 3650 days, or empty for never.")
    return timezone.now() + timedelta(days=days) if days else None


def _optional_number(text: str, kind: type[float] | type[int], what: str) -> Any:
    try:
        return kind(text) if text.strip() else None
    except ValueError:
        raise FormProblem(f"{what} must be a number.") from None


@login_required
@require_http_methods(["GET", "POST"])
def key_list(request: HttpRequest) -> HttpResponse:
    """The team's inference keys; members create keys here (each key is shown once)."""
    from portal.deployments.selectors import deployment_get, deployment_list

    access = page_access(request)
    new_key = ""
    error = ""
    if request.method == "POST":
        access.require_page(Role.MEMBER, "create inference keys")
        if (refused := _throttled(request, "keys")) is not None:
            return refused
        name = request.POST.get("name", "").strip()[:80]
        try:
            if not name:
                raise FormProblem("Give the key a name, for example the application that uses it.")
            deployment_id = request.POST.get("deployment", "").strip()
            deployment = (
                deployment_get(
                    team=access.team,
                    deployment_id=_optional_number(deployment_id, int, "The deployment"),
                )
                if deployment_id
                else None
            )
            rate = _optional_number(request.POST.get("rate_per_s", ""), float, "The rate limit")
            burst = _optional_number(request.POST.get("burst", ""), int, "The burst")
            if rate is not None and rate <= 0:
                raise FormProblem(
                    "The rate limit must be a positive number of requests per second."
                )
            if burst is not None and burst < 1:
                raise FormProblem("The burst must be at least 1.")
            _, new_key = services.key_create(
                team=access.team,
                user=access.user,
                name=name,
                deployment=deployment,
                expires_at=_expiry_from_days(request.POST.get("expires_days", "")),
                rate_per_s=rate,
                burst=burst,
            )
        except FormProblem as exc:
            error = str(exc)
        except APIException as exc:
            error = str(exc.detail)
    context = {
        "keys": selectors.keys_for_team(team=access.team),
        "new_key": new_key,
        "error": error,
        "access": access,
        "deployments": deployment_list(team=access.team),
    }
    if getattr(request, "htmx", False) and request.method == "POST":
        return render(request, "accounts/htmx/key_created.html", context)
    return render(request, "accounts/keys.html", context)


@require_POST
@login_required
def key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    """Revoke a key; the deployments refuse it within a second."""
    access = page_access(request)
    key = selectors.key_get(team=access.team, key_id=key_id)
    access.require_page(Role.MEMBER, "revoke inference keys")
    services.key_revoke(key=key, user=access.user)
    if getattr(request, "htmx", False):
        key.refresh_from_db()
        return render(request, "accounts/htmx/key_row.html", {"key": key, "access": access})
    messages.success(request, f"Key {key.name!r} revoked.")
    return redirect("accounts:keys")
