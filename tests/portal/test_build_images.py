"""``manage.py build_images`` (what ``make run`` starts in the background): the converter
image is built ahead, so the first upload finds it."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
from django.core.management import call_command

from tests.conftest import REPO

# The session's converter image (built once where a Docker engine answers).
from tests.deployer.convert.conftest import converter_image, docker_engine  # noqa: F401


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command("build_images", *args, stdout=out)
    return out.getvalue()


def test_without_a_docker_engine_it_says_there_is_nothing_to_build(
    monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    settings.MODELPORT_CONVERSION_SANDBOX = "auto"
    assert "No Docker engine answers" in _run()


def test_with_local_conversion_and_instances_it_builds_nothing(settings: Any) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_RUNTIME = "local"
    text = _run()
    assert "MODELPORT_CONVERSION_SANDBOX=local" in text
    assert "MODELPORT_RUNTIME=local" in text


def test_a_built_converter_image_is_found_and_named(
    converter_image: str,  # noqa: F811 - the fixture imported above
    settings: Any,
    tmp_path: Any,
) -> None:
    import os

    settings.MODELPORT_CONVERSION_SANDBOX = "auto"
    settings.MODELPORT_IMAGE_CACHE_DIR = str(
        os.environ.get("MODELPORT_TEST_IMAGE_CACHE") or tmp_path / "cache"
    )
    text = _run("--only", "converter")
    assert f"The converter image {converter_image} is ready" in text
    assert "already built" in text


def test_the_stack_starts_it_in_the_background_and_it_ends_by_itself() -> None:
    """The stack's helper runs the command as a one-off process (its end stops nothing)."""
    import os

    from portal.stack import _build_images_ahead

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings_test",
        "DOCKER_HOST": "tcp://127.0.0.1:9",
    }
    process = _build_images_ahead(env)
    assert process.wait(timeout=120) == 0
    # The same command by hand says what it did.
    out = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "build_images"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "No Docker engine answers" in out.stdout
