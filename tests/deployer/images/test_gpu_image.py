"""The GPU runtime image (opt-in: about 1.6 GB of wheels and a 2.8 GB image).

    MODELPORT_TEST_GPU_IMAGE=1 make pytest PYTEST_ARGS=tests/deployer/images/test_gpu_image.py

On a host without a GPU this proves what can be proved there: the image builds from
PyPI wheels (onnxruntime-gpu with the CUDA and cuDNN wheels), onnxruntime offers the
CUDA provider, every CUDA library it links resolves inside the image except the
driver's libcuda (the NVIDIA container runtime injects that), and a model served with
``--device gpu`` stays not ready with a reason instead of silently running on CPU.
Running it on a GPU needs an engine with the NVIDIA runtime.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from deployer.images import ModelImageRequest, docker_client, model_image_ensure
from deployer.images.runtime import runtime_image_ensure
from tests.onnx_models import linear_model

pytestmark = pytest.mark.skipif(
    os.environ.get("MODELPORT_TEST_GPU_IMAGE") != "1",
    reason="opt-in (large download): set MODELPORT_TEST_GPU_IMAGE=1",
)


def test_gpu_runtime_image(docker_engine: None, tmp_path: Path) -> None:
    from portal.core import engine

    config = engine.image_config()
    client: Any = docker_client()
    runtime = runtime_image_ensure(config, device="gpu", client=client)
    assert runtime.ref.startswith("modelport/runtime:")
    assert "-gpu-" in runtime.ref

    providers = client.containers.run(
        runtime.ref,
        entrypoint=[
            "python",
            "-c",
            "import onnxruntime; print(onnxruntime.get_available_providers())",
        ],
        remove=True,
        network_mode="none",
    ).decode()
    assert "CUDAExecutionProvider" in providers
    linked = client.containers.run(
        runtime.ref,
        entrypoint=[
            "sh",
            "-c",
            "ldd /opt/modelport/lib/python3.11/site-packages/onnxruntime/capi/"
            "libonnxruntime_providers_cuda.so",
        ],
        remove=True,
        network_mode="none",
    ).decode()
    missing = [line.split()[0] for line in linked.splitlines() if "not found" in line]
    assert missing == ["libcuda.so.1"], missing
    assert "libcudart.so" in linked
    assert "libcublas.so" in linked

    path = tmp_path / "model.onnx"
    linear_model(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    built = model_image_ensure(config, ModelImageRequest(path, sha, runtime), client=client)
    container = client.containers.run(
        built.ref,
        detach=True,
        network_mode="none",
        environment={"MODELPORT_SERVING_MODEL_NAME": "demo"},
    )
    try:
        deadline = time.monotonic() + 60
        logs = ""
        while time.monotonic() < deadline and '"not_ready"' not in logs:
            time.sleep(0.5)
            logs = container.logs().decode()
        assert '"event": "not_ready"' in logs
        assert "CUDA execution provider is not active" in logs
    finally:
        container.remove(force=True)
        client.images.remove(built.ref)
