"""The Team page in Chromium: an admin adds a person and changes a role in place (htmx)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from portal.accounts.models import Membership
from tests.browser.conftest import WIDTHS, PageWatch, shoot
from tests.conftest import Personas

pytestmark = [pytest.mark.browser]


def test_admin_manages_members_on_the_team_page(
    browser: Any, personas: Personas, live_server: Any
) -> None:
    User.objects.create_user("dana", email="dana@example.org", password="dana-password")
    base = live_server.url
    context = browser.new_context(viewport={"width": WIDTHS["wide"], "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("dialog", lambda dialog: dialog.accept())
    watch = PageWatch(page, base)
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill("alice-password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")

    page.get_by_role("link", name="Team").click()
    page.wait_for_url(f"{base}/accounts/members/")
    page.get_by_label("User name or e-mail").fill("dana@example.org")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Add to team").click()
    page.locator('tr[data-member="dana"]').wait_for()
    assert page.url == f"{base}/accounts/members/"  # swapped in place, no reload
    assert Membership.objects.get(team=personas.acme, user__username="dana").role == "viewer"

    # The table was just swapped in: let htmx finish settling it (and wire up its selects)
    # before changing a role, or the change can land on an element htmx has not processed.
    page.wait_for_function(
        "() => !document.querySelector('.htmx-request, .htmx-settling, .htmx-swapping')"
    )
    page.get_by_label("Role of bob").select_option("admin")
    page.locator(".timeline").filter(has_text="changed bob's role from member to admin").wait_for()
    assert Membership.objects.get(team=personas.acme, user__username="bob").role == "admin"

    page.get_by_label("User name or e-mail").fill("nobody")
    page.get_by_role("button", name="Add to team").click()
    page.get_by_role("alert").filter(has_text="No active user is called").wait_for()
    shoot(page, "team-wide")
    page.set_viewport_size({"width": WIDTHS["phone"], "height": 900})
    shoot(page, "team-phone")

    page.get_by_role("button", name="Remove dana").click()
    page.locator('tr[data-member="dana"]').wait_for(state="detached")
    assert not Membership.objects.filter(user__username="dana").exists()

    page.set_viewport_size({"width": WIDTHS["wide"], "height": 900})
    page.get_by_label("Invite as").select_option("viewer")
    page.get_by_role("button", name="Create invitation link").click()
    link = page.locator("#invite-url").inner_text()
    assert link.startswith(f"{base}/accounts/invite/")
    shoot(page, "team-invitation-wide")
    watch.check()
    context.close()

    # Someone without an account opens the link, creates one and lands in the team.
    guest = browser.new_context(viewport={"width": WIDTHS["phone"], "height": 800})
    visitor = guest.new_page()
    visitor.set_default_timeout(30_000)
    visitor.goto(link)
    shoot(visitor, "invitation-phone")
    visitor.get_by_label("Choose a user name").fill("erin")
    visitor.get_by_label("Choose a password").fill("a-long-erin-secret")
    visitor.get_by_role("button", name="Create account and join").click()
    visitor.wait_for_url(f"{base}/")
    assert "You are now a viewer of Acme." in visitor.content()
    assert Membership.objects.get(team=personas.acme, user__username="erin").role == "viewer"
    guest.close()
