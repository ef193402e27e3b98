"""The Kubernetes runtime's own small pieces that need no cluster."""

from __future__ import annotations

import pytest

from deployer.errors import LaunchError
from deployer.runtimes.kube.runtime import Handle, KubernetesRuntime, push_image


def test_a_handle_names_namespace_deployment_and_revision_and_reads_back() -> None:
    handle = Handle("modelport-serving", "mp-abcd1234-d7", "21")
    assert str(handle) == "modelport-serving/mp-abcd1234-d7@21"
    assert Handle.parse(str(handle)) == handle
    with pytest.raises(LaunchError, match="not a Kubernetes instance handle"):
        Handle.parse("0123456789ab")


def test_pushing_without_a_registry_says_which_setting_is_missing() -> None:
    with pytest.raises(LaunchError, match="MODELPORT_KUBE_REGISTRY is not set"):
        push_image("modelport-model:abc", "")


def test_gpus_are_asked_by_count_and_exact_ids_are_refused_before_the_cluster() -> None:
    from pathlib import Path

    from deployer.runtimes.base import LaunchSpec
    from deployer.runtimes.gpus import GpuRequest
    from deployer.runtimes.kube.manifests import KubeSettings, ServingSpec, desired

    runtime = KubernetesRuntime(KubeSettings(installation="t"), api=object())
    spec = LaunchSpec(
        deployment_id=3, revision_id=4, model_name="cnn", model_version="1",
        model_path=Path("m.onnx"), image="r/cnn:1", device="gpu",
        gpus=GpuRequest(device_ids=("0", "1")),
    )  # fmt: skip
    with pytest.raises(LaunchError, match=r"by count \(nvidia.com/gpu\).*not GPU 0, 1"):
        runtime.start(spec)
    serving = ServingSpec(
        deployment_id=3, revision_id=4, model_name="cnn", model_version="1",
        image="r/cnn:1", device="gpu", gpus=2,
    )  # fmt: skip
    text = str(desired(KubeSettings(installation="t"), serving))
    assert "'nvidia.com/gpu': '2'" in text
