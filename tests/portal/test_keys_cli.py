"""``modelport keys create|list|revoke`` against a real portal (a live server on a socket)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployer.cli import EXIT_AUTH, EXIT_OK, EXIT_REFUSED, main
from deployer.keys import read_keys_file
from portal.accounts.models import InferenceKey
from portal.deployments.inference_keys import all_keys_write, keys_file_path
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment


def _run(capsys: Any, url: str, token: str, *args: str) -> tuple[int, Any]:
    code = main(["--url", url, "--token", token, "--json", "keys", *args])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


@pytest.mark.django_db(transaction=True)
def test_cli_creates_lists_and_revokes_keys(
    personas: Personas, live_server: Any, capsys: Any, onnx_file: Any
) -> None:
    from portal.registry.models import Model

    deployment = running_deployment(
        ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file)
    )
    all_keys_write()
    url, bob = live_server.url, personas.bob.token
    code, created = _run(
        capsys, url, bob, "create", "--name", "ci", "--deployment", str(deployment.pk),
        "--expires-days", "30", "--rate", "10", "--burst", "20",
    )  # fmt: skip
    assert code == EXIT_OK
    assert created["key"].startswith("mpk_")
    assert created["expires_at"] is not None
    assert (created["rate_per_s"], created["burst"]) == (10.0, 20)
    row = InferenceKey.objects.get(pk=created["id"])
    assert row.key_id in {k.id for k in read_keys_file(keys_file_path(deployment.pk)).keys}

    code, listed = _run(capsys, url, bob, "list")
    assert code == EXIT_OK
    assert [k["key_id"] for k in listed["keys"]] == [row.key_id]
    assert "key" not in listed["keys"][0]

    code, revoked = _run(capsys, url, bob, "revoke", row.key_id)
    assert code == EXIT_OK
    assert revoked["state"] == "revoked"
    assert row.key_id not in {k.id for k in read_keys_file(keys_file_path(deployment.pk)).keys}

    # A viewer may list but not create; a bad request says why.
    code, _ = _run(capsys, url, personas.vera.token, "create", "--name", "nope")
    assert code == EXIT_AUTH
    code, refused = _run(capsys, url, bob, "create", "--name", "x", "--burst", "3")
    assert code == EXIT_REFUSED
    assert refused["error"]["code"] == "burst_needs_rate"
