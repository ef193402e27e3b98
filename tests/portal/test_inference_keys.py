"""Inference keys (issue 11.1) and account hardening (issue 12.4), portal side.

The keys file each deployment's instances read is written by the services before
they return; these tests read the real file the portal writes.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from deployer.keys import key_sha256, read_keys_file
from portal.accounts.models import ApiToken, InferenceKey
from portal.accounts.services import key_create, key_revoke, membership_set, token_create
from portal.core.models import Event
from portal.deployments.inference_keys import (
    PORTAL_KEY_ID,
    all_keys_write,
    keys_file_path,
    keys_last_used_record,
    portal_key,
)
from portal.deployments.models import Deployment
from portal.deployments.services import deployment_public_set
from portal.registry.models import Model
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment


@pytest.fixture
def deployments(personas: Personas, onnx_file: Path) -> tuple[Deployment, Deployment, Deployment]:
    """Two acme deployments and one of globex."""
    demo = Model.objects.create(team=personas.acme, name="demo")
    version = ready_version(demo, 1, onnx_file)
    production = running_deployment(version, "production")
    staging = running_deployment(version, "staging")
    other = Model.objects.create(team=personas.globex, name="other")
    theirs = running_deployment(ready_version(other, 1, onnx_file), "production")
    all_keys_write()  # as a rollout does for its deployment
    return production, staging, theirs


def _ids(deployment: Deployment) -> set[str]:
    return {k.id for k in read_keys_file(keys_file_path(deployment.pk)).keys}


def test_team_key_is_in_every_team_deployment_file_and_stored_only_hashed(
    personas: Personas, deployments: Any
) -> None:
    production, staging, theirs = deployments
    row, key = key_create(team=personas.acme, user=personas.bob.user, name="app")
    assert key.startswith("mpk_")
    assert len(key) > 40
    assert row.prefix == key[:12]
    assert row.key_hash == key_sha256(key)
    assert _ids(production) == _ids(staging) == {PORTAL_KEY_ID, row.key_id}
    assert row.key_id not in _ids(theirs)
    text = keys_file_path(production.pk).read_text()
    assert key not in text
    assert key_sha256(key) in text
    assert not InferenceKey.objects.filter(key_hash=key).exists()
    assert Event.objects.filter(step="key", message__contains="created").exists()


def test_deployment_key_is_only_in_its_deployment_file(
    personas: Personas, deployments: Any
) -> None:
    production, staging, _ = deployments
    row, _key = key_create(
        team=personas.acme, user=personas.bob.user, name="only-prod", deployment=production
    )
    assert row.key_id in _ids(production)
    assert row.key_id not in _ids(staging)


def test_revocation_reaches_the_file_within_seconds(personas: Personas, deployments: Any) -> None:
    production, _, _ = deployments
    row, _key = key_create(team=personas.acme, user=personas.bob.user, name="soon-gone")
    started = time.monotonic()
    assert key_revoke(key=row, user=personas.alice.user) is True
    elapsed = time.monotonic() - started
    assert row.key_id not in _ids(production)
    print(f"revocation written to the keys file in {elapsed * 1000:.1f} ms")
    assert elapsed < 2, elapsed
    assert key_revoke(key=row, user=personas.alice.user) is False  # twice is harmless


def test_expiry_and_rate_limit_reach_the_file_and_expired_keys_leave_it(
    personas: Personas, deployments: Any
) -> None:
    production, _, _ = deployments
    expires = timezone.now() + timedelta(hours=1)
    row, _key = key_create(
        team=personas.acme, user=personas.bob.user, name="limited",
        expires_at=expires, rate_per_s=2.0, burst=4,
    )  # fmt: skip
    entry = next(
        k for k in read_keys_file(keys_file_path(production.pk)).keys if k.id == row.key_id
    )
    assert entry.expires_at == int(expires.timestamp())
    assert (entry.rate_per_s, entry.burst) == (2.0, 4)
    InferenceKey.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    row.refresh_from_db()
    assert row.state() == "expired"
    all_keys_write()  # what reconcile does every 30 s
    assert row.key_id not in _ids(production)


def test_public_flag_is_audited_and_reaches_the_file(personas: Personas, deployments: Any) -> None:
    production, staging, _ = deployments
    assert deployment_public_set(deployment=production, public=True, user=personas.alice.user)
    assert read_keys_file(keys_file_path(production.pk)).public is True
    assert read_keys_file(keys_file_path(staging.pk)).public is False
    event = Event.objects.get(deployment=production, step="access")
    assert "public" in event.message
    assert event.actor == personas.alice.user
    assert not deployment_public_set(deployment=production, public=True, user=personas.alice.user)
    deployment_public_set(deployment=production, public=False, user=personas.alice.user)
    assert read_keys_file(keys_file_path(production.pk)).public is False


def test_public_flag_shows_on_the_deployment_page_and_snippets_carry_the_key(
    personas: Personas, deployments: Any
) -> None:
    production, _, _ = deployments
    client = Client()
    client.force_login(personas.alice.user)
    page = client.get(f"/deployments/{production.pk}/").content.decode()
    assert "private" in page
    assert "Authorization: Bearer $MODELPORT_KEY" in page
    assert "headers=headers" in page  # tritonclient http and grpc
    assert "tritonclient.grpc" in page
    deployment_public_set(deployment=production, public=True, user=personas.alice.user)
    page = client.get(f"/deployments/{production.pk}/").content.decode()
    assert "public</span>" in page
    assert "Make private" in page
    assert "Authorization: Bearer" not in page


def test_portal_key_is_stable_per_deployment_and_accepted(deployments: Any) -> None:
    production, staging, _ = deployments
    all_keys_write()
    assert portal_key(production.pk) == portal_key(production.pk) != portal_key(staging.pk)
    portal = next(
        k for k in read_keys_file(keys_file_path(production.pk)).keys if k.id == PORTAL_KEY_ID
    )
    assert portal.sha256 == key_sha256(portal_key(production.pk))


# ---------------------------------------------------------------- API


def test_api_creates_a_key_shown_once_then_lists_and_revokes_it(
    personas: Personas, deployments: Any
) -> None:
    production, _, _ = deployments
    client = personas.bob.client()
    created = client.post(
        "/api/v1/keys/",
        {"name": "svc", "deployment": production.pk, "rate_per_s": 5, "burst": 10,
         "expires_at": (timezone.now() + timedelta(days=7)).isoformat()},
        format="json",
    )  # fmt: skip
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["key"].startswith("mpk_")
    assert body["state"] == "active"
    assert body["deployment"] == production.pk
    listed = client.get("/api/v1/keys/").json()
    assert [k["id"] for k in listed] == [body["id"]]
    assert "key" not in listed[0]
    assert body["key_id"] in _ids(production)
    revoked = client.delete(f"/api/v1/keys/{body['id']}/")
    assert revoked.status_code == 200
    assert revoked.json()["state"] == "revoked"
    assert body["key_id"] not in _ids(production)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"name": "x", "burst": 3}, "burst_needs_rate"),
        ({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, "expiry_in_past"),
        ({"name": "x", "rate_per_s": 0}, "invalid"),
        ({}, "invalid"),
    ],
)
def test_api_refuses_bad_keys_with_a_code(
    personas: Personas, payload: dict[str, Any], code: str
) -> None:
    response = personas.bob.client().post("/api/v1/keys/", payload, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == code


def test_key_page_shows_the_key_once(personas: Personas, deployments: Any) -> None:
    client = Client()
    client.force_login(personas.bob.user)
    created = client.post(
        "/accounts/keys/", {"name": "web", "expires_days": "30"}, HTTP_HX_REQUEST="true"
    )
    html = created.content.decode()
    assert created.status_code == 200
    assert 'id="new-key"' in html
    assert "mpk_" in html
    assert 'hx-swap-oob="true"' in html  # the table updates too
    again = client.get("/accounts/keys/").content.decode()
    assert 'id="new-key"' not in again
    assert "web" in again
    bad = client.post("/accounts/keys/", {"name": "w", "rate_per_s": "fast"})
    assert "The rate limit must be a number" in bad.content.decode()


def test_last_used_comes_from_the_instances_access_log(
    personas: Personas, deployments: Any, settings: Any
) -> None:
    """The runtime's access line names the accepted key (``"key": "k_12"``); the portal
    reads the live instance's log file, as the log view does.

    The log line here is written by the test in the agreed format, since the serving
    runtime that writes it is another branch's work (the end-to-end test uses the real one).
    """
    from deployer.runtimes.local import LocalProcessRuntime
    from portal.core.engine import local_state_dir

    production, _, _ = deployments
    row, _key = key_create(team=personas.acme, user=personas.bob.user, name="used")
    state_dir = local_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = "proc-999999-1"
    (state_dir / f"{handle}.json").write_text(
        json.dumps({"pid": 999999, "start_time": "1", "deployment_id": production.pk,
                    "revision_id": production.current_revision_id, "log": "used.log"})
    )  # fmt: skip
    (state_dir / "used.log").write_text(
        '{"ts":"2026-12-01T10:00:00.000Z","level":"info","logger":"deployer.serving.access",'
        f'"method":"POST","path":"/v2/models/demo/infer","status":200,"key":"{row.key_id}"}}\n'
        '{"ts":"2026-12-01T10:05:00.250Z","level":"info","logger":"deployer.serving.access",'
        f'"method":"POST","path":"/v2/models/demo/infer","status":200,"key":"{row.key_id}"}}\n'
        '{"ts":"2026-12-01T10:06:00.000Z","level":"info","logger":"deployer.serving.access",'
        '"method":"POST","path":"/v2/models/demo/infer","status":200,"key":"portal"}\n'
        "not json\n"
    )
    revision = production.current_revision
    revision.runtime, revision.handle = "local", handle
    revision.save()
    assert LocalProcessRuntime(state_dir).log_file(handle) is not None
    assert keys_last_used_record() == 1
    row.refresh_from_db()
    assert row.last_used_at is not None
    assert row.last_used_at.isoformat().startswith("2026-12-01T10:05:00.25")


# ---------------------------------------------------------------- accounts (12.4)


def test_expired_api_token_is_refused(personas: Personas) -> None:
    api_token, token = token_create(
        user=personas.bob.user, team=personas.acme, name="short",
        expires_at=timezone.now() + timedelta(minutes=5),
    )  # fmt: skip
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/models/").status_code == 200
    ApiToken.objects.filter(pk=api_token.pk).update(expires_at=timezone.now())
    response = client.get("/api/v1/models/")
    assert response.status_code == 401
    assert response.json()["code"] == "token_expired"


def test_an_api_token_records_when_it_was_last_used_and_the_tokens_page_shows_it(
    personas: Personas,
) -> None:
    from django.test import Client
    from rest_framework.test import APIClient

    api_token, token = token_create(user=personas.bob.user, team=personas.acme, name="ci")
    page = Client()
    page.force_login(personas.bob.user)
    listed = page.get("/accounts/tokens/").content.decode()
    assert "<td>ci</td>" in listed
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    before = timezone.now()
    assert client.get("/api/v1/models/").status_code == 200
    api_token.refresh_from_db()
    assert api_token.last_used_at is not None
    assert api_token.last_used_at >= before - timedelta(seconds=1)
    shown = page.get("/accounts/tokens/").content.decode()
    assert f"{timezone.localtime(api_token.last_used_at):%Y-%m-%d %H:%M}" in shown
    # The last-used cell no longer says "never" (the placeholder and the expiry still do).
    assert shown.count(">never<") == listed.count(">never<") - 1


def test_session_api_call_of_a_multi_team_user_needs_the_team_header(
    personas: Personas,
) -> None:
    from rest_framework.test import APIClient

    Model.objects.create(team=personas.acme, name="acme-model")
    membership_set(team=personas.globex, user=personas.bob.user, role="viewer")
    client = APIClient()
    client.force_login(personas.bob.user)
    response = client.get("/api/v1/models/")
    assert response.status_code == 400
    assert response.json()["code"] == "team_required"
    assert "X-ModelPort-Team" in response.json()["detail"]
    named = client.get("/api/v1/models/", HTTP_X_MODELPORT_TEAM="acme")
    assert [m["name"] for m in named.json()] == ["acme-model"]
    assert client.get("/api/v1/models/", HTTP_X_MODELPORT_TEAM="globex").json() == []
    # One team only: nothing to choose between.
    single = APIClient()
    single.force_login(personas.vera.user)
    assert single.get("/api/v1/models/").status_code == 200


def test_sign_in_is_locked_after_repeated_failures(personas: Personas, settings: Any) -> None:
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        response = client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
        assert response.status_code == 200
    locked = client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.content.decode()
    # Even the right password is refused while locked.
    right = client.post("/accounts/login/", {"username": "bob", "password": "bob-password"})
    assert right.status_code == 429
    # Another user from the same address is not locked (user name + address).
    other = client.post("/accounts/login/", {"username": "vera", "password": "vera-password"})
    assert other.status_code == 302


@pytest.fixture
def tight_rates() -> Any:
    from django.core.cache import cache
    from rest_framework.throttling import SimpleRateThrottle

    rates = SimpleRateThrottle.THROTTLE_RATES
    saved = dict(rates)
    rates.update({"credentials": "2/hour", "user": "5/min"})
    cache.clear()
    yield
    rates.clear()
    rates.update(saved)
    cache.clear()


def test_key_creation_is_rate_limited(personas: Personas, tight_rates: Any) -> None:
    client = personas.bob.client()
    for n in range(2):
        assert client.post("/api/v1/keys/", {"name": f"k{n}"}, format="json").status_code == 201
    refused = client.post("/api/v1/keys/", {"name": "k3"}, format="json")
    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert int(refused["Retry-After"]) > 0
    page = Client()
    page.force_login(personas.alice.user)
    for n in range(2):
        assert page.post("/accounts/tokens/", {"name": f"t{n}"}).status_code == 200
    refused_page = page.post("/accounts/tokens/", {"name": "t3"})
    assert refused_page.status_code == 429
    assert int(refused_page["Retry-After"]) > 0


def test_api_is_rate_limited_per_user(personas: Personas, tight_rates: Any) -> None:
    client = personas.vera.client()
    statuses = [client.get("/api/v1/models/").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert personas.bob.client().get("/api/v1/models/").status_code == 200
