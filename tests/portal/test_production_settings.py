"""The production settings pass Django's deployment checks."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _check_deploy(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "MODELPORT_DATA_DIR": str(tmp_path),
        "MODELPORT_SECRET_KEY": secrets.token_urlsafe(50),
        "MODELPORT_DEBUG": "false",
        **extra,
    }
    if "MODELPORT_HTTPS" not in extra:
        env.pop("MODELPORT_HTTPS", None)
    # The browser tests' conftest sets this for their live server; production never has it.
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_passes_with_production_settings(tmp_path: Path) -> None:
    result = _check_deploy(
        tmp_path, MODELPORT_HTTPS="true", MODELPORT_ALLOWED_HOSTS="modelport.example.com"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_without_https(tmp_path: Path) -> None:
    """The check can fail: without the HTTPS settings Django warns."""
    result = _check_deploy(tmp_path)
    assert result.returncode != 0
    assert "SECURE_SSL_REDIRECT" in result.stdout + result.stderr
