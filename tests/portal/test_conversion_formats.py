"""The formats beyond ONNX, PyTorch and scikit-learn, end to end: uploaded through the API,
converted by a real worker in the converter container, checked, registered in MLflow, served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.conf import settings

from portal.core import engine
from portal.deployments import services as deployment_services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry.models import ModelVersion
from tests.conftest import Personas, Worker, wait_for

# The session's converter images and tree models (built once where a Docker engine answers).
from tests.deployer.convert import state_dict_models as sd
from tests.deployer.convert.conftest import (  # noqa: F401
    converter_image,
    docker_engine,
    hf_models,
    tensorflow_image,
    tf_models,
    transformers_image,
    tree_models,
    trees_image,
)
from tests.deployer.convert.tree_models import FEATURES, UNFAITHFUL
from tests.portal.factories import inference_headers


def _final(client: Any, model: str, number: int) -> dict[str, Any] | None:
    body = client.get(f"/api/v1/models/{model}/versions/{number}/").json()
    return body if body["status"] in ("ready", "failed") else None


def _upload(client: Any, model: str, files: dict[str, Path], **fields: str) -> int:
    handles = {k: v.open("rb") for k, v in files.items()}
    try:
        response = client.post(
            f"/api/v1/models/{model}/versions/", {**handles, **fields}, format="multipart"
        )
    finally:
        for handle in handles.values():
            handle.close()
    assert response.status_code == 202, response.content
    return int(response.json()["number"])


@pytest.fixture
def worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    """The test worker's environment, converting in containers only."""
    return {**worker_env, "MODELPORT_CONVERSION_SANDBOX": "docker"}


def test_tree_models_convert_on_the_worker_register_in_mlflow_and_serve(
    personas: Personas,
    celery_worker: Worker,
    trees_image: str,  # noqa: F811
    tree_models: dict[str, Path],  # noqa: F811
) -> None:
    from mlflow import MlflowClient

    client = personas.bob.client()
    assert client.post("/api/v1/models/", {"name": "trees"}, format="json").status_code == 201
    uploads = {
        "xgb_multi.ubj": ("xgboost", "ready"),
        "lgb_binary.txt": ("lightgbm", "ready"),
        "cb_reg.cbm": ("catboost", "ready"),
        UNFAITHFUL: ("lightgbm", "failed"),
    }
    numbers = {name: _upload(client, "trees", {"file": tree_models[name]}) for name in uploads}
    mlflow = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    for name, (fmt, want) in uploads.items():
        version = wait_for(
            lambda n=numbers[name]: _final(client, "trees", n), timeout_s=600, what=name
        )
        assert version["status"] == want, (name, version["error"], celery_worker.log_text()[-3000:])
        assert version["source_format"] == fmt
        conversion = version["report"]["conversion"]
        assert conversion["sandbox"] == "container"
        if want == "failed":
            # The check ran against LightGBM itself and stopped the unfaithful model.
            assert version["error_code"] == "check_failed"
            assert conversion["passed"] is False
            continue
        assert conversion["passed"] is True
        assert fmt in conversion["versions"]
        assert all(o["passed"] for o in conversion["check"]["outputs"])
        row = ModelVersion.objects.get(model__name="trees", number=numbers[name])
        run = mlflow.get_run(row.mlflow_run_id)
        assert run.data.params["conversion_source_format"] == fmt
        assert run.data.metrics["check_passed"] == 1.0
        artifacts = {a.path for a in mlflow.list_artifacts(row.mlflow_run_id)}
        assert {name, "report.json"} <= artifacts

    # The LightGBM classifier, deployed: it answers with the labels and probabilities.
    row = ModelVersion.objects.get(model__name="trees", number=numbers["lgb_binary.txt"])
    revision = deployment_services.deployment_deploy(
        version=row, name="production", user=personas.bob.user
    )
    try:
        # The worker rolls it out (enqueued on commit), as it would for the API's deploy.
        deployment = wait_for(
            lambda: Deployment.objects.filter(
                pk=revision.deployment_id,
                status__in=[DeploymentStatus.RUNNING, DeploymentStatus.FAILED],
            ).first(),
            timeout_s=300,
            what="the rollout",
        )
        assert deployment.status == DeploymentStatus.RUNNING, deployment.error
        rows = np.random.default_rng(3).normal(size=(4, FEATURES)).astype(np.float32)
        response = requests.post(
            f"{deployment.endpoint_url}/infer",
            headers=inference_headers(deployment.endpoint_url),
            json={
                "inputs": [
                    {
                        "name": "input",
                        "shape": [4, FEATURES],
                        "datatype": "FP32",
                        "data": rows.ravel().tolist(),
                    }
                ]
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        probabilities = np.array(outputs["probabilities"]["data"]).reshape(4, 2)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert outputs["label"]["data"] == probabilities.argmax(axis=1).tolist()
    finally:
        runtime = engine.runtime()
        for instance in runtime.owned():
            runtime.stop(instance.handle, grace_s=1)


def test_state_dict_keras_savedmodel_and_transformers_convert_on_the_worker_into_mlflow(
    personas: Personas,
    celery_worker: Worker,
    converter_image: str,  # noqa: F811
    tf_models: dict[str, Path],  # noqa: F811
    hf_models: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    sd.state_dict_zip(tmp_path / "net.zip")
    np.save(tmp_path / "x.npy", sd.sample())
    client = personas.bob.client()
    assert client.post("/api/v1/models/", {"name": "more"}, format="json").status_code == 201
    uploads = {
        "torch_state_dict": {"file": tmp_path / "net.zip", "sample_input": tmp_path / "x.npy"},
        "keras": {"file": tf_models["model.keras"]},
        "tf_saved_model": {"file": tf_models["saved.tar.gz"]},
        "transformers": {"file": hf_models["bert.tar.gz"]},
    }
    numbers = {fmt: _upload(client, "more", files) for fmt, files in uploads.items()}
    mlflow = MlflowClient(settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_TRACKING_URI)
    for fmt, number in numbers.items():
        version = wait_for(lambda n=number: _final(client, "more", n), timeout_s=900, what=fmt)
        log = celery_worker.log_text()[-3000:]
        assert version["status"] == "ready", (fmt, version["error"], log)
        assert version["source_format"] == fmt
        conversion = version["report"]["conversion"]
        assert conversion["sandbox"] == "container"
        assert conversion["passed"] is True
        row = ModelVersion.objects.get(model__name="more", number=number)
        run = mlflow.get_run(row.mlflow_run_id)
        assert run.data.params["conversion_source_format"] == fmt
        artifacts = {a.path for a in mlflow.list_artifacts(row.mlflow_run_id)}
        assert "report.json" in artifacts
        if fmt == "transformers":
            assert {i["name"] for i in version["signature"]["inputs"]} == {
                "input_ids",
                "attention_mask",
            }
            assert any("tokenizing is the caller's job" in n for n in conversion["notes"])
