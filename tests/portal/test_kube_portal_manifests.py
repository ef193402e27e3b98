"""The portal's own Kubernetes manifests: every overlay renders with kustomize and every
object is valid for the two newest Kubernetes minor versions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deployer" / "runtimes"))
from kube_schemas import newest_two, validate

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2] / "portal" / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (ROOT / "overlays").iterdir() if p.is_dir())


def render(path: Path) -> list[dict]:
    require("kubectl", shutil.which("kubectl") is not None, "kubectl renders kustomize overlays")
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_overlay_renders_and_validates(overlay: str) -> None:
    path = ROOT / "base" if overlay == "base" else ROOT / "overlays" / overlay
    objects = render(path)
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Role",
        "RoleBinding",
        "PersistentVolumeClaim",
    } <= kinds
    for version in newest_two():
        for manifest in objects:
            validate(manifest, version)


def test_web_workers_and_scheduler_are_there_hardened_and_only_the_deployer_has_rights() -> None:
    objects = render(ROOT / "overlays" / "production")
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {
        "modelport-web",
        "modelport-pipeline-worker",
        "modelport-deploy-worker",
        "modelport-scheduler",
    }
    assert deployments["modelport-web"]["spec"]["replicas"] == 3
    assert deployments["modelport-scheduler"]["spec"]["strategy"] == {"type": "Recreate"}
    for name, obj in deployments.items():
        pod = obj["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert pod["automountServiceAccountToken"] is (name == "modelport-deploy-worker"), name
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == "modelport-serving"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "modelport-deployer", "namespace": "modelport"}
    ]


def test_the_portal_hands_serving_to_the_kubernetes_runtime_when_asked(settings) -> None:
    from deployer.runtimes.kube.runtime import KubernetesRuntime
    from portal.core import engine

    settings.MODELPORT_RUNTIME = "kubernetes"
    settings.MODELPORT_KUBE_NAMESPACE = "serving-test"
    settings.MODELPORT_KUBE_REGISTRY = "registry.test/models"
    assert engine.builds_images()
    runtime = engine.runtime()
    assert isinstance(runtime, KubernetesRuntime)
    assert runtime.settings.namespace == "serving-test"
    assert runtime.settings.registry == "registry.test/models"
    assert runtime.settings.installation == settings.MODELPORT_INSTALLATION_ID
