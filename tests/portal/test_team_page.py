"""The Team page: admins add people, set roles and remove members; every change is audited."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from portal.accounts.models import ApiToken, Membership
from portal.core.models import Event
from tests.conftest import Personas


def _signed_in(who: str) -> Client:
    client = Client()
    assert client.login(username=who, password=f"{who}-password")
    return client


def _membership(personas: Personas, name: str) -> Membership:
    return Membership.objects.get(team=personas.acme, user__username=name)


@pytest.fixture
def dana(db: None) -> User:
    return User.objects.create_user("dana", email="Dana@Example.org", password="dana-password")


def test_team_page_lists_members_and_only_admins_get_the_controls(personas: Personas) -> None:
    page = _signed_in("alice").get("/accounts/members/")
    assert page.status_code == 200
    text = page.content.decode()
    for name in ("alice", "bob", "vera"):
        assert f'data-member="{name}"' in text
    assert "charlie" not in text
    assert "Add to team" in text
    as_member = _signed_in("bob").get("/accounts/members/").content.decode()
    assert 'data-member="alice"' in as_member
    assert "Add to team" not in as_member
    assert "/remove" not in as_member


def test_admin_adds_an_existing_user_by_email_and_it_is_audited(
    personas: Personas, dana: User
) -> None:
    response = _signed_in("alice").post(
        "/accounts/members/", {"identifier": "dana@example.org", "role": "viewer"}
    )
    assert response.status_code == 302
    assert Membership.objects.get(team=personas.acme, user=dana).role == "viewer"
    event = Event.objects.get(team=personas.acme, step="member")
    assert event.actor == personas.alice.user
    assert event.message == "alice added dana as viewer"
    # dana can now sign in and see acme's page.
    assert _signed_in("dana").get("/accounts/members/").status_code == 200


def test_adding_by_htmx_returns_the_members_fragment(personas: Personas, dana: User) -> None:
    response = _signed_in("alice").post(
        "/accounts/members/", {"identifier": "DANA", "role": "member"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert text.startswith('<div id="members">')
    assert "<html" not in text
    assert 'data-member="dana"' in text


@pytest.mark.parametrize(
    ("identifier", "role", "message"),
    [
        ("nobody", "member", "No active user is called &#x27;nobody&#x27;"),
        ("bob", "member", "bob is already a member of Acme"),
        ("dana", "owner", "Unknown role &#x27;owner&#x27;"),
        ("", "member", "Give the person&#x27;s user name or e-mail address."),
    ],
)
def test_bad_additions_say_what_is_wrong(
    personas: Personas, dana: User, identifier: str, role: str, message: str
) -> None:
    response = _signed_in("alice").post(
        "/accounts/members/", {"identifier": identifier, "role": role}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200  # htmx swaps only 2xx answers
    assert '<p class="flash flash-error" role="alert">' in response.content.decode()
    assert message in response.content.decode()
    assert not Event.objects.filter(step="member").exists()


def test_admin_changes_a_role_and_it_is_audited(personas: Personas) -> None:
    bob = _membership(personas, "bob")
    response = _signed_in("alice").post(
        f"/accounts/members/{bob.pk}/role", {"role": "admin"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    bob.refresh_from_db()
    assert bob.role == "admin"
    event = Event.objects.get(team=personas.acme, step="member")
    assert event.message == "alice changed bob's role from member to admin"
    assert event.level == "warning"
    # The new role counts at once: bob may now roll back and delete.
    assert personas.bob.client().delete("/api/v1/models/none/").status_code == 404


def test_the_last_admin_cannot_be_demoted_or_removed(personas: Personas) -> None:
    alice = _membership(personas, "alice")
    client = _signed_in("alice")
    demoted = client.post(
        f"/accounts/members/{alice.pk}/role", {"role": "member"}, HTTP_HX_REQUEST="true"
    )
    assert demoted.status_code == 200
    assert "alice is the only admin of Acme" in demoted.content.decode()
    removed = client.post(f"/accounts/members/{alice.pk}/remove")
    assert removed.status_code == 302
    alice.refresh_from_db()
    assert alice.role == "admin"
    assert not Event.objects.filter(step="member").exists()


def test_removing_a_member_revokes_their_team_tokens(personas: Personas) -> None:
    api = personas.bob.client()
    assert api.get("/api/v1/models/").status_code == 200
    bob = _membership(personas, "bob")
    response = _signed_in("alice").post(f"/accounts/members/{bob.pk}/remove")
    assert response.status_code == 302
    assert not Membership.objects.filter(pk=bob.pk).exists()
    assert ApiToken.objects.get(user=personas.bob.user).revoked_at is not None
    refused = api.get("/api/v1/models/")
    assert refused.status_code == 401
    event = Event.objects.get(team=personas.acme, step="member")
    assert event.message == "alice removed bob from the team and revoked 1 API token(s)"
    # bob has no team left: the team page says so.
    assert _signed_in("bob").get("/accounts/members/").status_code == 404


def test_members_and_viewers_cannot_manage_and_outsiders_cannot_see_ids(
    personas: Personas, dana: User
) -> None:
    vera = _membership(personas, "vera")
    for who in ("bob", "vera"):
        client = _signed_in(who)
        assert client.post("/accounts/members/", {"identifier": "dana"}).status_code == 403
        assert (
            client.post(f"/accounts/members/{vera.pk}/role", {"role": "admin"}).status_code == 403
        )
        assert client.post(f"/accounts/members/{vera.pk}/remove").status_code == 403
    charlie = _signed_in("charlie")  # admin of globex, not of acme
    assert charlie.post(f"/accounts/members/{vera.pk}/role", {"role": "admin"}).status_code == 404
    assert charlie.post(f"/accounts/members/{vera.pk}/remove").status_code == 404
    vera.refresh_from_db()
    assert vera.role == "viewer"
    assert not Membership.objects.filter(user=dana).exists()


def test_admin_leaving_goes_back_to_the_models_page(personas: Personas) -> None:
    bob = _membership(personas, "bob")
    bob.role = "admin"
    bob.save()
    response = _signed_in("bob").post(f"/accounts/members/{bob.pk}/remove", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert response.headers["HX-Redirect"] == "/"
    assert not Membership.objects.filter(pk=bob.pk).exists()


def _invite(role: str = "member") -> str:
    """Create an invitation as alice through the page; the link's path."""
    response = _signed_in("alice").post(
        "/accounts/members/invite", {"role": role}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert text.startswith('<div id="members">')
    start = text.index("/accounts/invite/")
    return text[start : text.index("<", start)].rstrip("/") + "/"


def test_an_invitation_link_creates_an_account_and_joins_once(personas: Personas) -> None:
    from django.contrib.auth import SESSION_KEY

    link = _invite("viewer")
    stranger = Client()
    page = stranger.get(link)
    assert page.status_code == 200
    assert "Join Acme" in page.content.decode()
    weak = stranger.post(link, {"username": "erin", "password": "123"})
    assert weak.status_code == 400
    assert "too short" in weak.content.decode()
    joined = stranger.post(link, {"username": "erin", "password": "a-long-erin-secret"})
    assert joined.status_code == 302
    erin = User.objects.get(username="erin")
    assert stranger.session[SESSION_KEY] == str(erin.pk)
    assert Membership.objects.get(team=personas.acme, user=erin).role == "viewer"
    messages = list(
        Event.objects.filter(team=personas.acme, step="member").values_list("message", flat=True)
    )
    assert messages[0].startswith("alice created an invitation link for a viewer")
    assert messages[1] == "erin joined with an invitation link as viewer"
    # Once only.
    again = Client().get(link)
    assert again.status_code == 410
    assert "already used" in again.content.decode()


def test_a_signed_in_user_joins_with_an_invitation(personas: Personas) -> None:
    link = _invite("member")
    charlie = _signed_in("charlie")
    assert charlie.post(link).status_code == 302
    assert Membership.objects.get(team=personas.acme, user=personas.charlie.user).role == "member"
    assert Membership.objects.filter(user=personas.charlie.user).count() == 2


def test_expired_unknown_and_taken_invitations_are_refused(personas: Personas) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from portal.accounts.models import Invitation

    assert Client().get("/accounts/invite/not-a-key/").status_code == 410
    link = _invite()
    taken = Client().post(link, {"username": "BOB", "password": "a-long-bob-secret"})
    assert taken.status_code == 400
    assert "is taken" in taken.content.decode()
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    expired = Client().get(link)
    assert expired.status_code == 410
    assert "expired" in expired.content.decode()
    for who in ("bob", "vera"):
        assert (
            _signed_in(who).post("/accounts/members/invite", {"role": "admin"}).status_code == 403
        )
