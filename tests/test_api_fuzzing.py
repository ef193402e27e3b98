"""Schemathesis against the live API's own OpenAPI schema: no server errors, no schema
violations, across every operation (with examples, coverage, fuzzing and stateful phases)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from portal.registry.models import Model
from tests.conftest import BIN, REPO, Personas
from tests.portal.factories import ready_version, running_deployment

pytestmark = pytest.mark.e2e


def test_schemathesis_finds_no_server_errors(
    personas: Personas, live_server: Any, onnx_file: Path, tmp_path: Path
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    ready_version(model, 1, onnx_file)
    deployment = running_deployment(ready_version(model, 2, onnx_file))
    # Random ids only ever find 404s on deploy and rollback; pin their paths to the
    # objects above so that their bodies get fuzzed against real rows.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[[operations]]\n"
        'include-name = "POST /api/v1/deployments/{deployment_id}/rollback"\n'
        f'parameters = {{ "path.deployment_id" = {deployment.pk} }}\n\n'
        "[[operations]]\n"
        'include-name = "POST /api/v1/models/{name}/versions/{number}/deploy"\n'
        'parameters = { "path.name" = "demo", "path.number" = 2 }\n'
    )
    report = tmp_path / "schemathesis.json"
    command = [
        str(BIN / "st"), "--config-file", str(config), "run", f"{live_server.url}/api/schema/",
        "--header", f"Authorization: Token {personas.alice.token}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "25", "--workers", "1", "--seed", "7",
        "--generation-database", "none",
        "--report", "json", "--report-json-path", str(report),
        "--request-timeout", "30", "--no-color",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = done.stdout + done.stderr
    data = json.loads(report.read_text()) if report.exists() else {}
    failures = data.get("failures", [])
    summary = {
        "operations_tested": data.get("operations", {}).get("tested", 0),
        "operations_total": data.get("operations", {}).get("total", 0),
        "test_cases": data.get("test_cases", {}).get("generated", 0),
        "failures": len(failures),
        "server_errors": sum("ST101" in json.dumps(f) for f in failures),
        "errors": len(data.get("errors", [])),
        "phases": {k: v.get("status") for k, v in data.get("phases", {}).items()},
        "warnings": {k: v for k, v in data.get("warnings", {}).items() if v},
    }
    out = REPO / "artifacts" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "schemathesis.json").write_text(json.dumps(summary, indent=2))
    (out / "schemathesis.txt").write_text(output)
    print(f"schemathesis: {summary}")
    assert done.returncode == 0, output[-6000:]
    assert data.get("complete") is True
    assert summary["failures"] == summary["errors"] == 0
    assert summary["operations_tested"] == summary["operations_total"] >= 15
    assert summary["test_cases"] > 300
