"""The objects one ModelPort deployment is on Kubernetes, as plain manifests (dicts).

Per deployment: a ``Deployment`` (rolling update that never drops below the ready count),
a ``Service`` with the REST and gRPC ports, a ``NetworkPolicy`` that admits only the
gateway, and a ``HorizontalPodAutoscaler`` when the deployment may scale. Pods get the
same hardening as our containers: non-root, read-only root file system with a small
in-memory ``/tmp``, every capability dropped, no privilege escalation, seccomp
``RuntimeDefault``, no service-account token.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from deployer.errors import LaunchError
from deployer.images.runtime import RUNTIME_UID, SERVING_PORTS

Manifest = dict[str, Any]

GROUP = "modelport.io"
INSTALLATION = f"{GROUP}/installation"
DEPLOYMENT = f"{GROUP}/deployment"
REVISION = f"{GROUP}/revision"
SPEC_HASH = f"{GROUP}/spec-hash"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Order of creation; deletion goes the other way (the autoscaler first, the pods last).
KIND_ORDER = ("NetworkPolicy", "Service", "Deployment", "HorizontalPodAutoscaler")


@dataclass(frozen=True)
class KubeSettings:
    """Where and how this installation serves on a cluster."""

    installation: str
    namespace: str = "modelport-serving"
    # Model images are pushed here after they are built (``registry.example:5000/models``).
    registry: str = ""
    image_pull_secret: str = ""
    # Labels of the gateway pods (the only ones the NetworkPolicy lets in), and of their
    # namespace when the gateway runs in another one.
    gateway_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "modelport-gateway"}
    )
    gateway_namespace_labels: dict[str, str] = field(default_factory=dict)
    tmp_mb: int = 64
    cpu_target_percent: int = 70
    # Also write a KServe InferenceService (clusters that run KServe) instead of our own
    # Deployment and Service.
    kserve: bool = False


@dataclass(frozen=True)
class ServingSpec:
    """One revision of a deployment, as the cluster should run it."""

    deployment_id: int
    revision_id: int
    model_name: str
    model_version: str
    image: str
    device: str = "cpu"
    gpus: int = 1
    cpus: float = 1.0
    memory_mb: int = 1024
    min_replicas: int = 1
    max_replicas: int = 1

    def check(self) -> ServingSpec:
        """This spec, if it can be run; else a LaunchError that names the field."""
        if not self.image:
            raise LaunchError(f"Version {self.model_version} has no image to run.")
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise LaunchError(
                "Replicas must satisfy 1 <= min <= max "
                f"(got {self.min_replicas}..{self.max_replicas})."
            )
        if self.device not in ("cpu", "gpu"):
            raise LaunchError(f"{self.device!r} is not a device (cpu or gpu).")
        if self.device == "gpu" and self.gpus < 1:
            raise LaunchError("A GPU deployment needs at least one GPU.")
        return self


def object_name(settings: KubeSettings, deployment_id: int) -> str:
    """The name every object of a deployment shares (``mp-<installation>-d<id>``)."""
    name = f"mp-{settings.installation}-d{deployment_id}"
    if not _NAME.match(name):
        raise LaunchError(f"{name!r} is not a valid Kubernetes object name.")
    return name


def selector(settings: KubeSettings, deployment_id: int) -> dict[str, str]:
    """The labels that pick a deployment's pods (every revision of it)."""
    return {INSTALLATION: settings.installation, DEPLOYMENT: str(deployment_id)}


def spec_hash(manifest: Manifest) -> str:
    """A digest of what a manifest asks for (its spec, labels and annotations but this one)."""
    meta = manifest.get("metadata", {})
    annotations = {k: v for k, v in meta.get("annotations", {}).items() if k != SPEC_HASH}
    subject = {
        "spec": manifest.get("spec"),
        "labels": meta.get("labels", {}),
        "annotations": annotations,
    }
    return hashlib.sha256(json.dumps(subject, sort_keys=True).encode()).hexdigest()[:16]


def _meta(settings: KubeSettings, spec: ServingSpec, name: str) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "modelport-serving",
        "app.kubernetes.io/managed-by": "modelport",
        "app.kubernetes.io/instance": name,
        **selector(settings, spec.deployment_id),
    }
    return {"name": name, "namespace": settings.namespace, "labels": labels}


def _stamp(manifest: Manifest) -> Manifest:
    manifest["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec_hash(manifest)
    return manifest


def _resources(spec: ServingSpec) -> dict[str, Any]:
    limits: dict[str, str] = {"cpu": f"{int(spec.cpus * 1000)}m", "memory": f"{spec.memory_mb}Mi"}
    if spec.device == "gpu":
        # Extended resources are whole units and requests must equal limits.
        limits["nvidia.com/gpu"] = str(spec.gpus)
    return {"requests": dict(limits), "limits": limits}


def _container(settings: KubeSettings, spec: ServingSpec) -> dict[str, Any]:
    ports = [
        {"name": name, "containerPort": port, "protocol": "TCP"}
        for name, port in SERVING_PORTS.items()
    ]
    ready_path = f"/v2/models/{spec.model_name}/ready"
    return {
        "name": "serving",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "MODELPORT_SERVING_MODEL_NAME", "value": spec.model_name},
            {"name": "MODELPORT_SERVING_MODEL_VERSION", "value": spec.model_version},
            {"name": "MODELPORT_SERVING_DEVICE", "value": spec.device},
        ],
        "ports": ports,
        # The runtime answers ready only after its warm-up inference has run; the portal
        # also checks the known answer through the Service before it routes traffic.
        "readinessProbe": {
            "httpGet": {"path": ready_path, "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 90,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": _resources(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
    }


def deployment(settings: KubeSettings, spec: ServingSpec) -> Manifest:
    """The ``apps/v1`` Deployment: the pods of the revision, rolled without a gap."""
    name = object_name(settings, spec.deployment_id)
    meta = _meta(settings, spec, name)
    pod_labels = {**meta["labels"], REVISION: str(spec.revision_id)}
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(settings, spec)],
        "volumes": [
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": f"{settings.tmp_mb}Mi"}}
        ],
    }
    if settings.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": settings.image_pull_secret}]
    body: dict[str, Any] = {
        "selector": {"matchLabels": selector(settings, spec.deployment_id)},
        # A new revision's pod must be ready before an old one goes: never below the count.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "minReadySeconds": 0,
        "progressDeadlineSeconds": 600,
        "revisionHistoryLimit": 5,
        "template": {
            "metadata": {"labels": pod_labels, "annotations": {REVISION: str(spec.revision_id)}},
            "spec": pod_spec,
        },
    }
    if spec.max_replicas == spec.min_replicas:
        # With an autoscaler the replica count is its to set: leaving it out of the
        # manifest keeps a re-apply from fighting it.
        body["replicas"] = spec.min_replicas
    meta["annotations"] = {REVISION: str(spec.revision_id)}
    return _stamp({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": body})


def service(settings: KubeSettings, spec: ServingSpec) -> Manifest:
    """The ClusterIP Service: one stable in-cluster address with the REST and gRPC ports."""
    name = object_name(settings, spec.deployment_id)
    ports = [
        {"name": "http", "port": SERVING_PORTS["http"], "targetPort": "http", "protocol": "TCP"},
        {
            "name": "grpc",
            "port": SERVING_PORTS["grpc"],
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        },
    ]
    body = {"type": "ClusterIP", "selector": selector(settings, spec.deployment_id), "ports": ports}
    return _stamp(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(settings, spec, name),
            "spec": body,
        }
    )


def network_policy(settings: KubeSettings, spec: ServingSpec) -> Manifest:
    """Only the gateway's pods may reach the serving ports; nothing else gets in."""
    name = object_name(settings, spec.deployment_id)
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(settings.gateway_labels)}}
    if settings.gateway_namespace_labels:
        peer["namespaceSelector"] = {"matchLabels": dict(settings.gateway_namespace_labels)}
    body = {
        "podSelector": {"matchLabels": selector(settings, spec.deployment_id)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [peer],
                "ports": [
                    {"protocol": "TCP", "port": SERVING_PORTS["http"]},
                    {"protocol": "TCP", "port": SERVING_PORTS["grpc"]},
                ],
            }
        ],
    }
    return _stamp(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(settings, spec, name),
            "spec": body,
        }
    )


def autoscaler(settings: KubeSettings, spec: ServingSpec) -> Manifest:
    """An ``autoscaling/v2`` HorizontalPodAutoscaler between min and max replicas."""
    name = object_name(settings, spec.deployment_id)
    body = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": settings.cpu_target_percent,
                    },
                },
            }
        ],
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 120}},
    }
    return _stamp(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(settings, spec, name),
            "spec": body,
        }
    )


def inference_service(settings: KubeSettings, spec: ServingSpec) -> Manifest:
    """A KServe ``InferenceService`` with our runtime image as a custom predictor.

    Our runtime already speaks the V2 protocol KServe routes, so it needs no adapter."""
    name = object_name(settings, spec.deployment_id)
    container = _container(settings, spec)
    container["name"] = "kserve-container"
    # KServe routes one port to a custom predictor: REST (its gRPC routing needs h2c names).
    container["ports"] = [{"containerPort": SERVING_PORTS["http"], "protocol": "TCP"}]
    predictor: dict[str, Any] = {
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        "containers": [container],
        "securityContext": deployment(settings, spec)["spec"]["template"]["spec"][
            "securityContext"
        ],
        "volumes": [
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": f"{settings.tmp_mb}Mi"}}
        ],
    }
    meta = _meta(settings, spec, name)
    meta["annotations"] = {"serving.kserve.io/deploymentMode": "RawDeployment"}
    return _stamp(
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": meta,
            "spec": {"predictor": predictor},
        }
    )


def desired(settings: KubeSettings, spec: ServingSpec) -> list[Manifest]:
    """Every object a revision of a deployment needs, in creation order."""
    spec.check()
    if settings.kserve:
        return [network_policy(settings, spec), inference_service(settings, spec)]
    objects = [network_policy(settings, spec), service(settings, spec), deployment(settings, spec)]
    if spec.max_replicas > spec.min_replicas:
        objects.append(autoscaler(settings, spec))
    return objects
