"""Choosing the runtime, the building step without an engine, and what the web may read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.core import engine
from portal.deployments import services
from portal.registry import services as registry_services
from portal.registry.choices import VersionStatus
from portal.registry.models import Model
from tests.conftest import Personas


@pytest.fixture
def no_engine_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_resolved", None)


def test_auto_uses_docker_when_an_engine_answers(
    docker_engine: None, settings: Any, no_engine_cache: None
) -> None:
    settings.MODELPORT_RUNTIME = "auto"
    assert engine.builds_images()
    assert engine.runtime_name() == "docker"
    assert engine.runtime().name == "docker"
    assert {r.name for r in engine.runtimes_in_use()} == {"docker", "local"}


def test_auto_falls_back_to_local_processes_without_an_engine(
    personas: Personas,
    settings: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_engine_cache: None,
) -> None:
    from tests.onnx_models import linear_model

    settings.MODELPORT_RUNTIME = "auto"
    monkeypatch.setattr("deployer.images.build.engine_available", lambda: False)
    assert engine.runtime_name() == "local"

    model = Model.objects.create(team=personas.acme, name="demo")
    path = tmp_path / "m.onnx"
    linear_model(path)
    version = registry_services.version_upload(
        model=model, file=SimpleUploadedFile(path.name, path.read_bytes()), user=personas.bob.user
    )
    registry_services.version_process(version_id=version.pk)
    version.refresh_from_db()
    # The pipeline worker cannot know (it has no socket): the deploy worker decides.
    assert version.status == VersionStatus.BUILDING
    registry_services.version_build(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.READY
    assert version.image_ref == ""
    assert "local process" in version.events.order_by("-id").first().message


def test_the_web_reads_gpu_facts_from_the_deploy_worker(settings: Any) -> None:
    settings.MODELPORT_RUNTIME = "docker"
    (Path(settings.DATA_DIR) / "runtime" / "engine.json").unlink(missing_ok=True)
    assert services.gpu_unavailable_reason() == ""  # nothing known yet: the worker checks
    engine.engine_facts_record(runtime="docker", gpu_reason="no NVIDIA runtime here")
    assert services.gpu_unavailable_reason() == "no NVIDIA runtime here"
    engine.engine_facts_record(runtime="docker", gpu_reason="")
    assert services.gpu_unavailable_reason() == ""


def test_a_bad_installation_id_is_refused_at_start() -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import portal.settings"],
        env={**os.environ, "MODELPORT_INSTALLATION_ID": "Not-Valid"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "MODELPORT_INSTALLATION_ID" in result.stderr
