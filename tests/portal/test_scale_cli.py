"""``modelport scale`` and ``modelport deploy --min-replicas`` against a real portal (a live
server on a socket); the replicas themselves start on the deploy worker (see
tests/portal/test_replicas.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployer.cli import EXIT_AUTH, EXIT_OK, EXIT_REFUSED, main
from portal.core.models import Event
from portal.deployments.models import Deployment
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment


def _run(capsys: Any, url: str, token: str, *args: str) -> tuple[int, Any, str]:
    code = main(["--url", url, "--token", token, "--json", *args])
    captured = capsys.readouterr()
    out = captured.out.strip()
    return code, json.loads(out) if out else None, captured.err


@pytest.mark.django_db(transaction=True)
def test_cli_scales_a_deployment_and_refuses_what_cannot_be(
    personas: Personas, live_server: Any, capsys: Any, onnx_file: Any
) -> None:
    from portal.registry.models import Model

    deployment = running_deployment(
        ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file)
    )
    url, bob = live_server.url, personas.bob.token
    scale = ["scale", "--model", "demo", "--deployment", deployment.name]

    code, document, _ = _run(capsys, url, bob, *scale, "--min", "3", "--max", "5")
    assert code == EXIT_OK
    assert (document["deployment"]["min_replicas"], document["deployment"]["max_replicas"]) == (
        3,
        5,
    )
    deployment.refresh_from_db()
    assert (deployment.min_replicas, deployment.max_replicas) == (3, 5)
    assert Event.objects.filter(
        deployment=deployment, step="scale", message__contains="1..1 → 3..5"
    ).exists()

    # --max defaults to at least --min.
    code, document, _ = _run(capsys, url, bob, *scale, "--min", "6")
    assert code == EXIT_OK
    assert (document["deployment"]["min_replicas"], document["deployment"]["max_replicas"]) == (
        6,
        6,
    )

    code, _, err = _run(capsys, url, bob, *scale, "--min", "4", "--max", "2")
    assert code == EXIT_REFUSED
    assert "max_replicas (2) must not be below min_replicas (4)" in err
    code, _, _ = _run(capsys, url, personas.vera.token, *scale, "--min", "2")
    assert code == EXIT_AUTH
    assert Deployment.objects.get(pk=deployment.pk).min_replicas == 6

    # The deploy command passes the range on; a bad one is refused before anything starts.
    code, _, err = _run(
        capsys, url, bob, "deploy", "--model", "demo", "--version", "1",
        "--deployment", "other", "--min-replicas", "0",
    )  # fmt: skip
    assert code == EXIT_REFUSED
    assert "min_replicas" in err
    assert not Deployment.objects.filter(name="other").exists()
