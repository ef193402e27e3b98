"""An uploaded ONNX model is validated in the container when Docker answers (issue 12.3),
and in the limited child process on a server without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import pytest

from portal.registry import services
from portal.registry.choices import VersionStatus
from tests.conftest import Personas
from tests.deployer.convert.conftest import converter_image, docker_engine  # noqa: F401
from tests.onnx_models import linear_model
from tests.portal.test_conversion import _process, _upload


@pytest.mark.usefixtures("converter_image")
def test_with_docker_an_onnx_upload_is_validated_in_the_container(
    personas: Personas, tmp_path: Path, settings: Any
) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "docker"
    linear_model(tmp_path / "m.onnx")
    version = _process(_upload(personas, tmp_path / "m.onnx"))
    assert version.status == VersionStatus.READY, version.error
    assert version.report["validation"]["sandbox"] == "container"
    assert version.known_answer_path.is_file()
    left = docker.from_env().containers.list(
        all=True, filters={"label": f"modelport.version-uid={version.uid}"}
    )
    assert left == []


def test_with_docker_the_pipeline_worker_hands_an_onnx_upload_over(
    personas: Personas, tmp_path: Path, settings: Any
) -> None:
    """Validation needs the container, and only the deploy worker may start one."""
    settings.MODELPORT_CONVERSION_SANDBOX = "docker"
    linear_model(tmp_path / "m.onnx")
    version = _upload(personas, tmp_path / "m.onnx")
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status not in (VersionStatus.READY, VersionStatus.FAILED)
    assert not version.signature


def test_without_docker_an_onnx_upload_is_validated_in_a_child_process(
    personas: Personas, tmp_path: Path, settings: Any
) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    linear_model(tmp_path / "m.onnx")
    version = _process(_upload(personas, tmp_path / "m.onnx"))
    assert version.status == VersionStatus.READY, version.error
    assert version.report["validation"]["sandbox"] == "child-process"
