"""The version pipeline run in-process: validate, register in MLflow, ready — or a named failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.core.models import Event
from portal.registry import services
from portal.registry.choices import VersionStatus
from portal.registry.models import ModelVersion
from tests.conftest import Personas


def _upload(personas: Personas, content: bytes, name: str = "model.onnx") -> ModelVersion:
    from portal.registry.models import Model

    model, _ = Model.objects.get_or_create(team=personas.acme, name="demo")
    return services.version_upload(
        model=model, file=SimpleUploadedFile(name, content), user=personas.bob.user
    )


def _files_outside(version: ModelVersion) -> list[Path]:
    """Files in storage that are not inside some version's or batch job's own folder, plus
    any leftover working files inside this version's folder."""
    storage = Path(settings.MODELPORT_STORAGE_DIR)
    owned = (storage / "versions", storage / "batch")
    stray = [
        path
        for path in storage.rglob("*")
        if path.is_file() and not any(path.is_relative_to(folder) for folder in owned)
    ]
    stray += [p for p in (version.storage_dir / "work").rglob("*") if p.is_file()]
    return stray


def test_onnx_upload_becomes_ready_and_tracked(personas: Personas, onnx_file: Path) -> None:
    from mlflow import MlflowClient

    version = _upload(personas, onnx_file.read_bytes())
    assert version.status == VersionStatus.UPLOADED
    assert version.number == 1
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.READY, version.error
    assert version.progress == 100
    assert version.attempts == 1
    assert version.signature["inputs"][0]["shape"] == [-1, 4]
    assert version.served_model_path is not None
    assert version.served_model_path.is_file()
    assert version.known_answer_path.is_file()
    steps = list(Event.objects.filter(version=version).values_list("step", flat=True))
    assert steps == ["upload", "detect", "validate", "optimize", "register", "ready"]
    client = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    registered = client.get_model_version("acme.demo", version.mlflow_version)
    assert registered.run_id == version.mlflow_run_id
    assert registered.tags["modelport_sha256"] == version.sha256
    assert _files_outside(version) == []


def test_running_the_pipeline_again_does_nothing_twice(personas: Personas, onnx_file: Path) -> None:
    from mlflow import MlflowClient

    version = _upload(personas, onnx_file.read_bytes())
    services.version_process(version_id=version.pk)
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.READY
    assert version.attempts == 1
    client = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    mine = client.search_model_versions(
        f"name = 'acme.demo' and tags.modelport_version_uid = '{version.uid}'"
    )
    assert len(mine) == 1


def test_interrupted_registration_resumes_without_duplicates(
    personas: Personas, onnx_file: Path
) -> None:
    """A worker killed after MLflow registered but before the row was saved: the retry
    finds the registered version by its tag instead of creating a second one."""
    from mlflow import MlflowClient

    version = _upload(personas, onnx_file.read_bytes())
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    first = version.mlflow_version
    ModelVersion.objects.filter(pk=version.pk).update(
        status=VersionStatus.REGISTERING, mlflow_version="", mlflow_run_id=""
    )
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.READY
    assert version.mlflow_version == first
    client = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    mine = client.search_model_versions(
        f"name = 'acme.demo' and tags.modelport_version_uid = '{version.uid}'"
    )
    assert [v.version for v in mine] == [int(first)]


@pytest.mark.parametrize(
    ("content", "code", "phrase"),
    [
        (b"", "empty_file", "empty"),
        (b"PK\x03\x04 definitely not an onnx file", "not_onnx", "not an ONNX model"),
        (b"\x08\x07\x12\x04trun", "not_onnx", "not an ONNX model"),
    ],
)
def test_malformed_uploads_end_failed_with_the_cause(
    personas: Personas, content: bytes, code: str, phrase: str
) -> None:
    version = _upload(personas, content)
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED
    assert version.error_code == code
    assert phrase in version.error
    assert version.step == "validate"
    error_event = Event.objects.get(version=version, level="error")
    assert phrase in error_event.message
    assert _files_outside(version) == []


def test_truncated_model_fails(personas: Personas, onnx_file: Path) -> None:
    data = onnx_file.read_bytes()
    version = _upload(personas, data[: len(data) // 2])
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED
    assert version.error_code in {"not_onnx", "onnx_check_failed"}


def test_path_traversal_in_the_file_name_stays_in_storage(
    personas: Personas, onnx_file: Path
) -> None:
    version = _upload(personas, onnx_file.read_bytes(), name="../../../../etc/evil.onnx")
    assert version.file_name == "evil.onnx"
    assert version.upload_path.is_relative_to(version.storage_dir)
    assert _files_outside(version) == []


def test_version_that_keeps_failing_ends_failed(
    personas: Personas, onnx_file: Path, monkeypatch: Any
) -> None:
    from deployer.errors import TrackingError

    def broken(_request: object) -> None:
        raise TrackingError("MLflow is down")

    monkeypatch.setattr(services, "track_version", broken)
    version = _upload(personas, onnx_file.read_bytes())
    for _ in range(settings.MODELPORT_TASK_MAX_ATTEMPTS):
        with pytest.raises(TrackingError):
            services.version_process(version_id=version.pk)
    services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED
    assert version.error_code == "tracking_failed"
    assert f"after {settings.MODELPORT_TASK_MAX_ATTEMPTS} attempts" in version.error


def test_version_numbers_count_up_per_model(personas: Personas, onnx_file: Path) -> None:
    numbers = [_upload(personas, onnx_file.read_bytes()).number for _ in range(3)]
    assert numbers == [1, 2, 3]
