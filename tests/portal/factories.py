"""Rows for tests that do not need the pipeline to have run."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from django.utils import timezone

from portal.deployments.choices import DeploymentStatus, RevisionStatus
from portal.deployments.models import Deployment, Revision
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion


def ready_version(model: Model, number: int, onnx_file: Path | None = None) -> ModelVersion:
    """A version in state ready, with its model file in storage when one is given."""
    data = onnx_file.read_bytes() if onnx_file else b"onnx"
    version = ModelVersion.objects.create(
        model=model,
        number=number,
        uid=uuid.uuid4(),
        source_format="onnx",
        file_name="model.onnx",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        status=VersionStatus.READY,
        progress=100,
        signature={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
        },
        served_file="upload/model.onnx",
    )
    version.upload_path.parent.mkdir(parents=True, exist_ok=True)
    version.upload_path.write_bytes(data)
    return version


def running_deployment(
    version: ModelVersion, name: str = "production", **fields: Any
) -> Deployment:
    """A deployment whose live revision serves ``version`` (no instance behind it)."""
    deployment = Deployment.objects.create(
        model=version.model, name=name, status=DeploymentStatus.RUNNING, **fields
    )
    revision = Revision.objects.create(
        deployment=deployment,
        version=version,
        status=RevisionStatus.LIVE,
        live_from=timezone.now(),
    )
    deployment.current_revision = revision
    deployment.endpoint_url = f"http://127.0.0.1:9/v2/models/{version.model.name}"
    deployment.save()
    return deployment


def inference_headers(endpoint_url: str) -> dict[str, str]:
    """The portal's own key for the deployment now answering at ``endpoint_url`` (private
    deployments need a key); no header when no deployment has that address."""
    from portal.deployments.inference_keys import portal_headers

    base = endpoint_url.rstrip("/")
    deployment = Deployment.objects.filter(endpoint_url__in=[base, base + "/"]).first()
    return portal_headers(deployment.pk) if deployment is not None else {}
