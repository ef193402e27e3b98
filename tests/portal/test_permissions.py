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
