"""The version pipeline with conversion: detect, convert, check, optimize, register.

Services are called in-process (the worker's code path); the sandbox they choose is
real: a container where a Docker engine answers, else the limited child process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.core.models import Event
from portal.registry import services
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas, require_module
from tests.deployer.convert import conversion_models as cm

# The session's converter image (built once where a Docker engine answers).
from tests.deployer.convert.conftest import converter_image, docker_engine  # noqa: F401


def _upload(
    personas: Personas,
    path: Path,
    *,
    sample: Path | None = None,
    source_format: str = "",
    options: dict[str, Any] | None = None,
) -> ModelVersion:
    model, _ = Model.objects.get_or_create(team=personas.acme, name="demo")
    return services.version_upload(
        model=model,
        file=SimpleUploadedFile(path.name, path.read_bytes()),
        sample=SimpleUploadedFile(sample.name, sample.read_bytes()) if sample else None,
        source_format=source_format,
        options=options,
        user=personas.bob.user,
    )


def _process(version: ModelVersion) -> ModelVersion:
    """Run the pipeline here as the deploy worker would (it may start containers)."""
    services.version_process(version_id=version.pk, engine_access=True)
    version.refresh_from_db()
    return version


def _steps(version: ModelVersion) -> list[str]:
    return list(Event.objects.filter(version=version).values_list("step", flat=True))


def _leftovers(version: ModelVersion) -> list[Path]:
    work = version.storage_dir / "work"
    return [p for p in work.rglob("*") if p.is_file()] if work.exists() else []


@pytest.fixture
def local_only(settings: Any) -> None:
    """No containers: what a server without a Docker engine does."""
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_CONVERSION_TRUSTED_LOCAL = False


def test_skops_pipeline_is_converted_checked_and_registered(
    personas: Personas, tmp_path: Path, local_only: None
) -> None:
    from mlflow import MlflowClient

    cm.skops_file(tmp_path / "pipe.skops", cm.string_label_pipeline())
    version = _process(_upload(personas, tmp_path / "pipe.skops"))
    assert version.status == VersionStatus.READY, version.error
    assert version.source_format == "skops"
    assert _steps(version) == [
        "upload", "detect", "load", "convert", "check", "optimize", "validate", "register",
        "ready",
    ]  # fmt: skip
    durations = Event.objects.filter(version=version, step__in=["load", "convert", "check"])
    assert all(e.duration_ms is not None for e in durations)
    report = version.report["conversion"]
    assert report["passed"] is True
    assert report["sandbox"] == "child-process"
    assert {o["name"]: o["datatype"] for o in version.signature["outputs"]} == {
        "label": "BYTES",
        "probabilities": "FP32",
    }
    assert version.served_file == "converted/model.onnx"
    assert version.known_answer_path.is_file()
    assert _leftovers(version) == []

    client = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    run = client.get_run(version.mlflow_run_id)
    assert run.data.params["conversion_source_format"] == "skops"
    assert run.data.params["converter"] == "skl2onnx.to_onnx"
    assert run.data.metrics["check_passed"] == 1.0
    assert "max_abs_diff.probabilities" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(version.mlflow_run_id)}
    assert {"pipe.skops", "report.json"} <= artifacts


def test_api_shows_the_report_and_takes_conversion_options(
    personas: Personas, tmp_path: Path, local_only: None
) -> None:
    cm.skops_file(tmp_path / "pipe.skops", cm.string_label_pipeline())
    client = personas.bob.client()
    assert client.post("/api/v1/models/", {"name": "demo"}, format="json").status_code == 201
    with (tmp_path / "pipe.skops").open("rb") as handle:
        response = client.post(
            "/api/v1/models/demo/versions/",
            {"file": handle, "opset": "17", "rtol": "0.01", "quantize": "dynamic_int8"},
            format="multipart",
        )
    assert response.status_code == 202, response.content
    version = ModelVersion.objects.get(model__name="demo", number=1)
    assert version.options == {"opset": 17, "rtol": 0.01, "quantize": "dynamic_int8"}
    _process(version)
    body = client.get("/api/v1/models/demo/versions/1/").json()
    assert body["status"] == "ready", body["error"]
    conversion = body["report"]["conversion"]
    assert conversion["opset"] == 17
    assert conversion["options"]["rtol"] == 0.01
    assert conversion["quantization"]["kind"] == "dynamic_int8"
    assert "nothing to quantize" in conversion["quantization"]["reason"]

    with (tmp_path / "pipe.skops").open("rb") as handle:
        bad = client.post(
            "/api/v1/models/demo/versions/",
            {"file": handle, "opset": "3"},
            format="multipart",
        )
    assert bad.status_code == 400
    assert "opset" in bad.json()["detail"] or "opset" in json.dumps(bad.json())


def test_without_docker_pickles_are_refused_with_the_setting_to_change(
    personas: Personas, tmp_path: Path, local_only: None
) -> None:
    marker = tmp_path / "MARKER"
    cm.marker_pickle(tmp_path / "model.pkl", marker)
    version = _process(_upload(personas, tmp_path / "model.pkl"))
    assert version.status == VersionStatus.FAILED
    assert version.error_code == "conversion_refused"
    assert "MODELPORT_CONVERSION_TRUSTED_LOCAL" in version.error
    assert "skops" in version.error
    assert not marker.exists()
    assert _leftovers(version) == []


@pytest.mark.usefixtures("converter_image")
def test_with_docker_a_marker_pickle_runs_only_inside_the_container(
    personas: Personas, tmp_path: Path, settings: Any
) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "docker"
    marker = tmp_path / "MARKER"
    cm.marker_pickle(tmp_path / "model.pkl", marker)
    version = _process(_upload(personas, tmp_path / "model.pkl"))
    assert version.status == VersionStatus.FAILED
    assert version.error_code == "load_failed"
    assert not marker.exists()
    assert _leftovers(version) == []
    import docker

    leftover = docker.from_env().containers.list(
        all=True, filters={"label": f"modelport.version-uid={version.uid}"}
    )
    assert leftover == []


@pytest.mark.usefixtures("converter_image")
def test_with_docker_a_pickled_regressor_is_converted_in_the_container(
    personas: Personas, tmp_path: Path, settings: Any
) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "docker"
    model = cm.regressor()
    cm.pickle_file(tmp_path / "reg.pkl", model)
    version = _process(_upload(personas, tmp_path / "reg.pkl"))
    assert version.status == VersionStatus.READY, version.error
    assert version.report["conversion"]["sandbox"] == "container"
    assert version.source_format == "pickle"


def test_a_failed_check_fails_the_version_unless_overridden_with_a_reason(
    personas: Personas, tmp_path: Path, settings: Any
) -> None:
    require_module("torch")
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_CONVERSION_TRUSTED_LOCAL = True
    cm.noisy_torchscript_file(tmp_path / "noisy.pt")
    np.save(tmp_path / "x.npy", np.zeros((4, 3), dtype=np.float32))
    failed = _process(_upload(personas, tmp_path / "noisy.pt", sample=tmp_path / "x.npy"))
    assert failed.status == VersionStatus.FAILED
    assert failed.error_code == "check_failed"
    assert failed.step == "check"
    assert "override reason" in failed.error
    assert failed.report["conversion"]["check"]["passed"] is False
    assert Event.objects.filter(version=failed, step="check", level="error").exists()

    kept = _process(
        _upload(
            personas,
            tmp_path / "noisy.pt",
            sample=tmp_path / "x.npy",
            options={"override_reason": "the noise is intended"},
        )
    )
    assert kept.status == VersionStatus.READY, kept.error
    override = Event.objects.get(version=kept, step="check", level="warning", actor__isnull=False)
    assert "the noise is intended" in override.message
    assert override.actor == personas.bob.user


def test_mislabelled_and_unsupported_uploads_fail_at_detect_with_advice(
    personas: Personas, tmp_path: Path, local_only: None
) -> None:
    cm.pickle_file(tmp_path / "model.pkl", cm.regressor())
    mislabelled = _process(_upload(personas, tmp_path / "model.pkl", source_format="skops"))
    assert mislabelled.status == VersionStatus.FAILED
    assert mislabelled.error_code == "format_mismatch"
    assert mislabelled.step == "detect"
    np.savez(tmp_path / "arrays.npz", x=np.ones(3))
    npz = _process(_upload(personas, tmp_path / "arrays.npz"))
    assert npz.error_code == "unsupported_format"
    assert "sample input" in npz.error
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    legacy = _process(_upload(personas, tmp_path / "model.h5"))
    assert legacy.error_code == "unsupported_format"
    assert "model.save('model.keras')" in legacy.error
    # A LightGBM model is recognised, and refused where no container can convert it.
    (tmp_path / "model.txt").write_text("tree\nversion=v4\n")
    lgbm = _process(_upload(personas, tmp_path / "model.txt"))
    assert lgbm.source_format == "lightgbm"
    assert lgbm.error_code == "conversion_refused"
    assert "converted only in ModelPort's isolated converter container" in lgbm.error


def test_onnx_archive_with_external_data_is_served_from_its_folder(
    personas: Personas, tmp_path: Path, local_only: None
) -> None:
    folder = cm.onnx_with_external_data(tmp_path / "src")[0].parent
    cm.onnx_zip(tmp_path / "model.zip", folder)
    version = _process(_upload(personas, tmp_path / "model.zip"))
    assert version.status == VersionStatus.READY, version.error
    assert version.source_format == "onnx_archive"
    assert "extract" in _steps(version)
    served = version.served_model_path
    assert served is not None
    assert served.is_relative_to(version.storage_dir / "extracted")
    assert version.report["conversion"]["optimization"]["used"] is True


def test_zip_slip_archive_fails_and_writes_nothing_outside(
    personas: Personas, tmp_path: Path, local_only: None
) -> None:
    cm.zip_with_entries(tmp_path / "evil.zip", {"../../escape.onnx": b"x", "model.onnx": b"y"})
    version = _process(_upload(personas, tmp_path / "evil.zip"))
    assert version.status == VersionStatus.FAILED
    assert version.error_code == "unsafe_archive"
    storage = Path(settings.MODELPORT_STORAGE_DIR)
    assert not list(storage.rglob("escape.onnx"))


def test_pipeline_worker_hands_container_conversions_to_the_convert_worker(
    personas: Personas, tmp_path: Path, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Only workers with Docker start sandboxes: the pipeline worker hands them on."""
    settings.MODELPORT_CONVERSION_SANDBOX = "docker"
    cm.pickle_file(tmp_path / "reg.pkl", cm.regressor())
    version = _upload(personas, tmp_path / "reg.pkl")
    with django_capture_on_commit_callbacks() as callbacks:
        services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status not in (VersionStatus.READY, VersionStatus.FAILED)
    assert version.attempts == 0
    assert version.source_format == "pickle"
    assert "convert worker" in Event.objects.filter(version=version).last().message
    assert [c.func.__self__.name for c in callbacks if hasattr(c, "func")] == [
        "portal.registry.tasks.version_convert"
    ]


def test_reconcile_removes_converter_containers_a_killed_worker_left(
    converter_image: str,  # noqa: F811 - the fixture imported above
    docker_engine: Any,  # noqa: F811
    settings: Any,
) -> None:
    """A worker killed mid-conversion cannot remove its container; reconcile does, and
    leaves containers without our converter label alone."""
    from portal.core.tasks import _sweep_converters

    settings.MODELPORT_CONVERSION_SANDBOX = "docker"
    settings.MODELPORT_CONVERSION_TIMEOUT_S = -60  # everything counts as abandoned
    ours = docker_engine.containers.create(
        converter_image, ["sleep", "60"], labels={"modelport.role": "converter"}
    )
    other = docker_engine.containers.create(converter_image, ["sleep", "60"])
    try:
        assert _sweep_converters() >= 1
        remaining = {c.id for c in docker_engine.containers.list(all=True)}
        assert ours.id not in remaining
        assert other.id in remaining
    finally:
        other.remove(force=True)
        if ours.id in {c.id for c in docker_engine.containers.list(all=True)}:
            ours.remove(force=True)
