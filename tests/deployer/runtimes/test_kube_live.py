"""The whole path on a real cluster: deploy, infer through the Service, roll back, tear down.

No Kubernetes API server can run on our machines (no kube-apiserver in Debian, no image
registry for kind or k3s), so this runs only where ``MODELPORT_TEST_KUBECONFIG`` names a
cluster (and ``MODELPORT_TEST_KUBE_REGISTRY`` a registry it pulls from). Elsewhere it is
reported as not run, by name and with this reason, in CI too: it is the one test that is.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

KUBECONFIG = os.environ.get("MODELPORT_TEST_KUBECONFIG", "")
REGISTRY = os.environ.get("MODELPORT_TEST_KUBE_REGISTRY", "")
IMAGE = os.environ.get("MODELPORT_TEST_KUBE_IMAGE", "")  # a model image already built here

pytestmark = pytest.mark.skipif(
    not (KUBECONFIG and REGISTRY and IMAGE),
    reason=(
        "not run: needs a live cluster (MODELPORT_TEST_KUBECONFIG), a registry it pulls from "
        "(MODELPORT_TEST_KUBE_REGISTRY) and a model image (MODELPORT_TEST_KUBE_IMAGE); "
        "no Kubernetes API server can run on this machine"
    ),
)


def _infer_through_service(namespace: str, service: str, model: str) -> dict:
    """POST one V2 request to the Service from a throwaway pod's port-forward."""
    forward = subprocess.Popen(
        [
            "kubectl",
            "--kubeconfig",
            KUBECONFIG,
            "-n",
            namespace,
            "port-forward",
            f"svc/{service}",
            "18555:8000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import requests

        deadline = time.monotonic() + 30
        while True:
            try:
                meta = requests.get(f"http://127.0.0.1:18555/v2/models/{model}", timeout=2).json()
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        spec = meta["inputs"][0]
        shape = [1 if d < 0 else d for d in spec["shape"]]
        size = 1
        for dim in shape:
            size *= dim
        body = {
            "inputs": [
                {
                    "name": spec["name"],
                    "shape": shape,
                    "datatype": spec["datatype"],
                    "data": [0] * size,
                }
            ]
        }
        return requests.post(
            f"http://127.0.0.1:18555/v2/models/{model}/infer", json=body, timeout=30
        ).json()
    finally:
        forward.terminate()
        forward.wait(10)


def _wait_ready(runtime, handle: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = runtime.status(handle)
        if status.detail.endswith("available") and "of" not in status.detail:
            return
        time.sleep(2)
    raise AssertionError(f"{handle} not ready: {runtime.status(handle)}")


def test_deploy_infer_rollback_teardown_on_a_live_cluster(tmp_path: Path) -> None:
    from deployer.runtimes.base import InstanceState, LaunchSpec
    from deployer.runtimes.kube.manifests import KubeSettings
    from deployer.runtimes.kube.runtime import KubernetesRuntime, push_image

    settings = KubeSettings(
        installation="livetest",
        namespace=os.environ.get("MODELPORT_TEST_KUBE_NAMESPACE", "default"),
        registry=REGISTRY,
    )
    runtime = KubernetesRuntime(settings, kubeconfig=Path(KUBECONFIG))
    pushed = push_image(IMAGE, REGISTRY)
    model = json.loads(
        subprocess.run(["docker", "inspect", IMAGE], capture_output=True, check=True).stdout
    )[0]
    name = model["Config"]["Labels"].get("modelport.model", "model")
    first = runtime.start(
        LaunchSpec(
            deployment_id=1,
            revision_id=1,
            model_name=name,
            model_version="1",
            model_path=tmp_path,
            image=pushed,
        )
    )
    _wait_ready(runtime, first.handle)
    service = first.url.split("//", 1)[1].split(".", 1)[0]
    assert _infer_through_service(settings.namespace, service, name)["outputs"]
    second = runtime.start(
        LaunchSpec(
            deployment_id=1,
            revision_id=2,
            model_name=name,
            model_version="1",
            model_path=tmp_path,
            image=pushed,
        )
    )
    _wait_ready(runtime, second.handle)
    assert runtime.status(first.handle).state == InstanceState.EXITED
    runtime.stop(first.handle)  # replaced already: nothing happens
    assert runtime.status(second.handle).state == InstanceState.RUNNING
    runtime.stop(second.handle)
    deadline = time.monotonic() + 120
    while runtime.status(second.handle).state != InstanceState.MISSING:
        assert time.monotonic() < deadline
        time.sleep(2)
    assert [o for o in runtime.owned() if o.deployment_id == 1] == []
