"""Sign-in, team switching and the API tokens page."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from portal.accounts import selectors, services
from portal.accounts.access import page_access
from portal.accounts.middleware import SESSION_TEAM_KEY
from portal.accounts.models import ApiToken


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
        name = request.POST.get("name", "").strip()[:80]
        if not name:
            messages.error(request, "Give the token a name, for example the pipeline that uses it.")
        else:
            _, new_token = services.token_create(user=access.user, team=access.team, name=name)
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
