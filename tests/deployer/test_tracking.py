"""MLflow tracking against a real local store: a run, a logged model, a registered version."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.tracking import (
    VERSION_TAG,
    TrackingRequest,
    TrackingTarget,
    model_version_url,
    run_url,
    set_alias,
    track_version,
)
from tests.onnx_models import linear_model


@pytest.fixture
def target(tmp_path: Path) -> TrackingTarget:
    return TrackingTarget(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="modelport-test",
        artifact_root=str(tmp_path / "artifacts"),
    )


def _request(target: TrackingTarget, model: Path, uid: str) -> TrackingRequest:
    return TrackingRequest(
        target=target,
        registered_model="acme.demo",
        version_uid=uid,
        run_name="demo v1",
        model_path=model,
        params={"source_format": "onnx"},
        metrics={"size_bytes": 210.0},
        tags={"modelport_team": "acme"},
        documents={"report.json": {"ok": True}},
    )


def test_track_version_records_run_model_and_registered_version(
    target: TrackingTarget, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    model = tmp_path / "m.onnx"
    linear_model(model)
    result = track_version(_request(target, model, "uid-1"))
    client = MlflowClient(target.tracking_uri, registry_uri=target.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["source_format"] == "onnx"
    assert run.data.metrics["size_bytes"] == 210.0
    assert run.data.tags[VERSION_TAG] == "uid-1"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "report.json" in artifacts
    version = client.get_model_version("acme.demo", result.registry_version)
    assert version.tags[VERSION_TAG] == "uid-1"
    assert version.run_id == result.run_id


def test_retry_returns_the_first_result_without_duplicates(
    target: TrackingTarget, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    model = tmp_path / "m.onnx"
    linear_model(model)
    first = track_version(_request(target, model, "uid-2"))
    again = track_version(_request(target, model, "uid-2"))
    assert again == first
    client = MlflowClient(target.tracking_uri, registry_uri=target.tracking_uri)
    assert len(client.search_model_versions("name = 'acme.demo'")) == 1
    second = track_version(_request(target, model, "uid-3"))
    assert second.registry_version != first.registry_version


def test_alias_moves_between_versions(target: TrackingTarget, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    model = tmp_path / "m.onnx"
    linear_model(model)
    one = track_version(_request(target, model, "uid-a"))
    two = track_version(_request(target, model, "uid-b"))
    client = MlflowClient(target.tracking_uri, registry_uri=target.tracking_uri)
    set_alias(target, "acme.demo", "production", two.registry_version)
    assert (
        str(client.get_model_version_by_alias("acme.demo", "production").version)
        == two.registry_version
    )
    set_alias(target, "acme.demo", "production", one.registry_version)
    assert (
        str(client.get_model_version_by_alias("acme.demo", "production").version)
        == one.registry_version
    )


def test_ui_links() -> None:
    assert run_url("http://m:5000", "3", "abc") == "http://m:5000/#/experiments/3/runs/abc"
    assert model_version_url("http://m:5000", "acme.demo", "2") == (
        "http://m:5000/#/models/acme.demo/versions/2"
    )
