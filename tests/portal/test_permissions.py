"""Who may do what through the API: admin, member, viewer of the team, and an outsider.

Outsiders get 404 for everything of the team, so they cannot even learn names;
members who lack the role get 403; only team admins roll back and delete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.registry.models import Model
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment

ORDER = ("charlie", "vera", "bob", "alice")  # refused callers first, so mutations stay valid


@dataclass
class World:
    model: Model
    deployment_id: int
    scratch: Model


@pytest.fixture
def world(personas: Personas, onnx_file: Any) -> World:
    model = Model.objects.create(team=personas.acme, name="demo")
    v1 = ready_version(model, 1, onnx_file)
    ready_version(model, 2, onnx_file)
    deployment = running_deployment(v1)
    scratch = Model.objects.create(team=personas.acme, name="scratch")
    return World(model=model, deployment_id=deployment.pk, scratch=scratch)


def _upload() -> dict[str, Any]:
    return {"file": SimpleUploadedFile("m.onnx", b"\x08\x07")}


Call = Callable[[Any, World, str], Any]
CASES: list[tuple[str, Call, dict[str, int]]] = [
    ("list models", lambda c, w, who: c.get("/api/v1/models/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("create model", lambda c, w, who: c.post("/api/v1/models/", {"name": f"new-{who}"}),
     {"alice": 201, "bob": 201, "vera": 403, "charlie": 201}),
    ("read model", lambda c, w, who: c.get("/api/v1/models/demo/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("describe model", lambda c, w, who: c.patch("/api/v1/models/demo/", {"description": who}),
     {"alice": 200, "bob": 200, "vera": 403, "charlie": 404}),
    ("list versions", lambda c, w, who: c.get("/api/v1/models/demo/versions/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("upload version", lambda c, w, who: c.post(
        "/api/v1/models/demo/versions/", _upload(), format="multipart"),
     {"alice": 202, "bob": 202, "vera": 403, "charlie": 404}),
    ("read version", lambda c, w, who: c.get("/api/v1/models/demo/versions/1/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("deploy", lambda c, w, who: c.post(
        "/api/v1/models/demo/versions/2/deploy", {"deployment": f"d-{who}"}, format="json"),
     {"alice": 202, "bob": 202, "vera": 403, "charlie": 404}),
    ("list deployments", lambda c, w, who: c.get("/api/v1/deployments/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("read deployment", lambda c, w, who: c.get(f"/api/v1/deployments/{w.deployment_id}/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("revisions", lambda c, w, who: c.get(f"/api/v1/deployments/{w.deployment_id}/revisions/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("logs", lambda c, w, who: c.get(f"/api/v1/deployments/{w.deployment_id}/logs"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("rollback", lambda c, w, who: c.post(
        f"/api/v1/deployments/{w.deployment_id}/rollback", {"version": 2}, format="json"),
     {"alice": 202, "bob": 403, "vera": 403, "charlie": 404}),
    ("delete model", lambda c, w, who: c.delete("/api/v1/models/scratch/"),
     {"alice": 204, "bob": 403, "vera": 403, "charlie": 404}),
    ("delete deployment", lambda c, w, who: c.delete(f"/api/v1/deployments/{w.deployment_id}/"),
     {"alice": 202, "bob": 403, "vera": 403, "charlie": 404}),
]  # fmt: skip

# ---------------------------------------------------------------- issue 12: version deletion
# v2 has never served, so an admin may delete it; v1 serves, so even an admin is refused.
CASES += [
    ("delete version", lambda c, w, who: c.delete("/api/v1/models/demo/versions/2/"),
     {"alice": 204, "bob": 403, "vera": 403, "charlie": 404}),
    ("delete serving version", lambda c, w, who: c.delete("/api/v1/models/demo/versions/1/"),
     {"alice": 409, "bob": 403, "vera": 403, "charlie": 404}),
]  # fmt: skip
# ---------------------------------------------------------------- end of issue 12 block


# ---------------------------------------------------------------- inference keys (issue 11)
# Rows for inference keys and the public flag. Members create and revoke keys, viewers
# see them, only admins open a deployment to calls without a key.


def _acme_key_id(name: str = "matrix") -> int:
    from portal.accounts.models import InferenceKey, Team
    from portal.accounts.services import key_create

    team = Team.objects.get(slug="acme")
    key = InferenceKey.objects.filter(team=team, name=name).first()
    if key is None:
        key, _ = key_create(team=team, user=team.memberships.get(role="admin").user, name=name)
    return key.pk


KEY_CASES: list[tuple[str, Call, dict[str, int]]] = [
    ("list keys", lambda c, w, who: c.get("/api/v1/keys/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("create key", lambda c, w, who: c.post(
        "/api/v1/keys/", {"name": f"k-{who}"}, format="json"),
     {"alice": 201, "bob": 201, "vera": 403, "charlie": 201}),
    ("create deployment key", lambda c, w, who: c.post(
        "/api/v1/keys/", {"name": f"d-{who}", "deployment": w.deployment_id}, format="json"),
     {"alice": 201, "bob": 201, "vera": 403, "charlie": 404}),
    ("read key", lambda c, w, who: c.get(f"/api/v1/keys/{_acme_key_id()}/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("revoke key", lambda c, w, who: c.delete(f"/api/v1/keys/{_acme_key_id()}/"),
     {"alice": 200, "bob": 200, "vera": 403, "charlie": 404}),
    ("make public", lambda c, w, who: c.patch(
        f"/api/v1/deployments/{w.deployment_id}/", {"public": True}, format="json"),
     {"alice": 200, "bob": 403, "vera": 403, "charlie": 404}),
]  # fmt: skip
CASES.extend(KEY_CASES)
# ---------------------------------------------------------------- end of inference keys


@pytest.mark.parametrize(("action", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_permission_matrix(
    personas: Personas, world: World, action: str, call: Call, expected: dict[str, int]
) -> None:
    for who in ORDER:
        client = getattr(personas, who).client()
        response = call(client, world, who)
        assert response.status_code == expected[who], (
            f"{who} {action}: {response.status_code} {response.content[:300]!r}"
        )
        if response.status_code in (403, 404):
            body = response.json()
            assert body["code"] in {"forbidden", "not_found", "permission_denied"}
            assert body["detail"]


def test_outsider_sees_nothing_of_the_team_in_lists(personas: Personas, world: World) -> None:
    client = personas.charlie.client()
    assert client.get("/api/v1/models/").json() == []
    assert client.get("/api/v1/deployments/").json() == []
    assert client.get("/api/v1/deployments/", {"model": "demo"}).status_code == 404


def test_outsider_404_does_not_differ_from_a_missing_name(personas: Personas, world: World) -> None:
    client = personas.charlie.client()
    existing = client.get("/api/v1/models/demo/")
    missing = client.get("/api/v1/models/no-such-model/")
    assert existing.status_code == missing.status_code == 404
    assert existing.json()["code"] == missing.json()["code"] == "not_found"


def test_every_endpoint_needs_a_token(world: World) -> None:
    from rest_framework.test import APIClient

    client = APIClient()
    for path in ["/api/v1/models/", "/api/v1/models/demo/", "/api/v1/deployments/"]:
        response = client.get(path)
        assert response.status_code == 401
        assert response.json()["code"] == "not_authenticated"


def test_revoked_token_stops_working(personas: Personas, world: World) -> None:
    from portal.accounts.models import ApiToken
    from portal.accounts.services import token_revoke

    client = personas.bob.client()
    assert client.get("/api/v1/models/").status_code == 200
    token = ApiToken.objects.get(user=personas.bob.user)
    token_revoke(token=token, user=personas.bob.user)
    response = client.get("/api/v1/models/")
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_token"


def test_tokens_are_stored_only_as_hashes(personas: Personas) -> None:
    from portal.accounts.models import ApiToken

    for row in ApiToken.objects.all():
        assert personas.alice.token not in (row.key_hash, row.prefix)
        assert len(row.key_hash) == 64


def test_token_is_scoped_to_its_team(personas: Personas, world: World) -> None:
    """alice is made a member of globex too; her acme token still only sees acme."""
    from portal.accounts.services import membership_set

    membership_set(team=personas.globex, user=personas.alice.user, role="admin")
    Model.objects.create(team=personas.globex, name="globex-model")
    client = personas.alice.client()
    names = [m["name"] for m in client.get("/api/v1/models/").json()]
    assert "demo" in names
    assert "globex-model" not in names
    assert client.get("/api/v1/models/globex-model/").status_code == 404


# ---------------------------------------------------------------- pages


def _page(who: str) -> Any:
    from django.test import Client

    client = Client()
    assert client.login(username=who, password=f"{who}-password")
    return client


def _upload_form() -> dict[str, Any]:
    return {"file": SimpleUploadedFile("m.onnx", b"\x08\x07")}


PAGE_CASES: list[tuple[str, Call, dict[str, int]]] = [
    ("models page", lambda c, w, who: c.get("/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("create model page", lambda c, w, who: c.post("/", {"name": f"p-{who}"}),
     {"alice": 302, "bob": 302, "vera": 403, "charlie": 302}),
    ("model page", lambda c, w, who: c.get("/models/demo/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("upload page", lambda c, w, who: c.get("/models/demo/upload/"),
     {"alice": 200, "bob": 200, "vera": 403, "charlie": 404}),
    ("upload", lambda c, w, who: c.post("/models/demo/upload/", _upload_form()),
     {"alice": 302, "bob": 302, "vera": 403, "charlie": 404}),
    ("version page", lambda c, w, who: c.get("/models/demo/versions/1/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("version fragment", lambda c, w, who: c.get(
        "/models/demo/versions/1/", HTTP_HX_REQUEST="true"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("deploy button", lambda c, w, who: c.post(
        "/models/demo/versions/2/deploy", {"deployment": f"p-{who}", "device": "cpu"}),
     {"alice": 302, "bob": 302, "vera": 403, "charlie": 404}),
    ("deployments page", lambda c, w, who: c.get("/deployments/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("deployment page", lambda c, w, who: c.get(f"/deployments/{w.deployment_id}/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("deployment logs", lambda c, w, who: c.get(
        f"/deployments/{w.deployment_id}/", {"part": "logs"}, HTTP_HX_REQUEST="true"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("try it", lambda c, w, who: c.post(
        f"/deployments/{w.deployment_id}/try", {"input-input": "[[1, 2, 3, 4]]"}),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 404}),
    ("rollback button", lambda c, w, who: c.post(
        f"/deployments/{w.deployment_id}/rollback", {"version": 2}),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 404}),
    ("stop button", lambda c, w, who: c.post(f"/deployments/{w.deployment_id}/stop"),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 404}),
    ("tokens page", lambda c, w, who: c.get("/accounts/tokens/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
]  # fmt: skip

# ---------------------------------------------------------------- issue 12: the Team page


def _team_member(w: World, username: str) -> int:
    """The id of ``username``'s membership in acme (created as a viewer when missing)."""
    from django.contrib.auth.models import User

    from portal.accounts.models import Membership

    user, _ = User.objects.get_or_create(username=username)
    membership, _ = Membership.objects.get_or_create(
        team=w.model.team, user=user, defaults={"role": "viewer"}
    )
    return membership.pk


def _stranger() -> str:
    """A user in no team yet, whom an admin may add to theirs."""
    from django.contrib.auth.models import User

    User.objects.get_or_create(username="dana")
    return "dana"


# charlie is globex's admin: he may manage his own team, never acme's memberships.
PAGE_CASES += [
    ("team page", lambda c, w, who: c.get("/accounts/members/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("add member", lambda c, w, who: c.post(
        "/accounts/members/", {"identifier": _stranger(), "role": "viewer"}),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 302}),
    ("set role", lambda c, w, who: c.post(
        f"/accounts/members/{_team_member(w, 'erin')}/role", {"role": "member"}),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 404}),
    ("remove member", lambda c, w, who: c.post(
        f"/accounts/members/{_team_member(w, 'erin')}/remove"),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 404}),
    ("invitation link", lambda c, w, who: c.post("/accounts/members/invite", {"role": "viewer"}),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 302}),
]  # fmt: skip
# ---------------------------------------------------------------- end of issue 12 block


# ---------------------------------------------------------------- inference keys pages (issue 11)
KEY_PAGE_CASES: list[tuple[str, Call, dict[str, int]]] = [
    ("keys page", lambda c, w, who: c.get("/accounts/keys/"),
     {"alice": 200, "bob": 200, "vera": 200, "charlie": 200}),
    ("create key form", lambda c, w, who: c.post("/accounts/keys/", {"name": f"p-{who}"}),
     {"alice": 200, "bob": 200, "vera": 403, "charlie": 200}),
    ("revoke key button", lambda c, w, who: c.post(
        f"/accounts/keys/{_acme_key_id('page')}/revoke"),
     {"alice": 302, "bob": 302, "vera": 403, "charlie": 404}),
    ("public button", lambda c, w, who: c.post(
        f"/deployments/{w.deployment_id}/public", {"public": "true"}),
     {"alice": 302, "bob": 403, "vera": 403, "charlie": 404}),
]  # fmt: skip
PAGE_CASES.extend(KEY_PAGE_CASES)
# ---------------------------------------------------------------- end of inference keys pages


@pytest.mark.parametrize(("action", "call", "expected"), PAGE_CASES, ids=[c[0] for c in PAGE_CASES])
def test_page_permission_matrix(
    personas: Personas, world: World, action: str, call: Call, expected: dict[str, int]
) -> None:
    for who in ORDER:
        response = call(_page(who), world, who)
        assert response.status_code == expected[who], f"{who} {action}: {response.status_code}"


def test_matrix_summary(personas: Personas, world: World) -> None:
    """Runs both matrices once more and reports the figures issue 7 asks for."""
    import json

    from tests.conftest import REPO

    cells = unexpected = 0
    for cases, client_for in (
        (CASES, lambda who: getattr(personas, who).client()),
        (PAGE_CASES, _page),
    ):
        for _action, call, expected in cases:
            for who in ORDER:
                status = call(client_for(who), world, who).status_code
                cells += 1
                allowed = expected[who] < 400
                if status < 400 and not allowed:
                    unexpected += 1
    report = {
        "cells": cells,
        "api_endpoints": len(CASES),
        "pages": len(PAGE_CASES),
        "roles": len(ORDER),
        "unexpected_successes": unexpected,
    }
    out = REPO / "artifacts" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "permission_matrix.json").write_text(json.dumps(report, indent=2))
    print(f"permission matrix: {report}")
    assert unexpected == 0
    assert cells == (len(CASES) + len(PAGE_CASES)) * len(ORDER)
