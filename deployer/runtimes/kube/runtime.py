"""The Kubernetes runtime: serving handed to a cluster through the official client.

One ModelPort deployment is one Kubernetes ``Deployment`` (plus its Service,
NetworkPolicy and autoscaler); a revision is a pod template. ``start`` of a new
revision patches the template, which Kubernetes rolls out without going below the
ready count; ``stop`` of a revision that has since been replaced does nothing (its pods
are already gone, replaced by the rolling update), and ``stop`` of the live revision
tears the deployment down. A rollback is a ``start`` with the earlier revision's image:
nothing is rebuilt.

Everything is in one namespace (a setting), told apart by labels: the installation,
the deployment, the revision. One namespace keeps the RBAC of the deploy worker to one
``Role``, and a NetworkPolicy per deployment isolates teams at the network level as
well as a namespace per team would.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.errors import LaunchError
from deployer.images.runtime import SERVING_PORTS
from deployer.runtimes.base import (
    InstanceState,
    InstanceStatus,
    LaunchResult,
    LaunchSpec,
    OwnedInstance,
)
from deployer.runtimes.kube.decisions import (
    Action,
    ClusterEvent,
    Observed,
    RolloutState,
    Verb,
    events_explained,
    plan,
    pod_problem,
    rollout,
)
from deployer.runtimes.kube.manifests import (
    DEPLOYMENT,
    INSTALLATION,
    REVISION,
    KubeSettings,
    Manifest,
    ServingSpec,
    desired,
    object_name,
)

# kind -> (API group class, namespaced verb suffix) of the official client.
_APIS = {
    "Deployment": ("AppsV1Api", "namespaced_deployment"),
    "Service": ("CoreV1Api", "namespaced_service"),
    "NetworkPolicy": ("NetworkingV1Api", "namespaced_network_policy"),
    "HorizontalPodAutoscaler": ("AutoscalingV2Api", "namespaced_horizontal_pod_autoscaler"),
}


@dataclass(frozen=True)
class Handle:
    """``<namespace>/<object name>@<revision>``: which revision of which deployment."""

    namespace: str
    name: str
    revision: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}@{self.revision}"

    @classmethod
    def parse(cls, text: str) -> Handle:
        try:
            where, revision = text.rsplit("@", 1)
            namespace, name = where.split("/", 1)
        except ValueError as exc:
            raise LaunchError(f"{text!r} is not a Kubernetes instance handle.") from exc
        return cls(namespace, name, revision)


def push_image(image: str, registry: str) -> str:
    """Tag a locally built model image into ``registry`` and push it; the pushed name."""
    if not registry:
        raise LaunchError(
            "MODELPORT_KUBE_REGISTRY is not set: a cluster can only run images it can pull."
        )
    target = f"{registry.rstrip('/')}/{image.rsplit('/', 1)[-1]}"
    for command in (["docker", "tag", image, target], ["docker", "push", target]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise LaunchError(f"{' '.join(command[:2])} failed: {done.stderr.strip()[-500:]}")
    return target


class KubernetesRuntime:
    """Serving instances as Kubernetes Deployments in one namespace."""

    name = "kubernetes"

    def __init__(
        self, settings: KubeSettings, *, kubeconfig: Path | None = None, api: Any = None
    ) -> None:
        self.settings = settings
        self._kubeconfig = kubeconfig
        self._api = api

    # ------------------------------------------------------------ client
    @property
    def api(self) -> Any:
        """The official client's ApiClient (kubeconfig, else in-cluster credentials)."""
        if self._api is None:
            from kubernetes import client, config

            if self._kubeconfig is not None:
                self._api = config.new_client_from_config(config_file=str(self._kubeconfig))
            else:
                config.load_incluster_config()
                self._api = client.ApiClient()
        return self._api

    def _group(self, kind: str) -> tuple[Any, str]:
        from kubernetes import client

        group, suffix = _APIS[kind]
        return getattr(client, group)(self.api), suffix

    def _observe(self, deployment_id: int) -> list[Observed]:
        from kubernetes.client.exceptions import ApiException

        found = []
        name = object_name(self.settings, deployment_id)
        for kind in _APIS:
            api, suffix = self._group(kind)
            try:
                obj = getattr(api, f"read_{suffix}")(name, self.settings.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise LaunchError(f"Reading {kind} {name} failed: {exc.reason}") from exc
            found.append(Observed.of({"kind": kind, **self.api.sanitize_for_serialization(obj)}))
        return found

    def apply(self, actions: list[Action]) -> None:
        """Carry out a plan, in its order."""
        from kubernetes.client.exceptions import ApiException

        namespace = self.settings.namespace
        for action in actions:
            api, suffix = self._group(action.kind)
            try:
                if action.verb == Verb.CREATE:
                    getattr(api, f"create_{suffix}")(namespace, action.manifest)
                elif action.verb == Verb.PATCH:
                    getattr(api, f"patch_{suffix}")(action.name, namespace, action.manifest)
                else:
                    getattr(api, f"delete_{suffix}")(action.name, namespace)
            except ApiException as exc:
                if action.verb == Verb.DELETE and exc.status == 404:
                    continue
                raise LaunchError(
                    f"Kubernetes refused to {action.verb} {action.kind} {action.name}: "
                    f"{exc.reason} ({action.reason})"
                ) from exc

    def reconcile(self, spec: ServingSpec) -> list[Action]:
        """Make the cluster run ``spec``; the actions taken (none when it already does)."""
        actions = plan(desired(self.settings, spec), self._observe(spec.deployment_id))
        self.apply(actions)
        return actions

    # ------------------------------------------------------------ interface
    def start(self, spec: LaunchSpec) -> LaunchResult:
        if spec.device == "gpu" and spec.gpus.device_ids:
            raise LaunchError(
                "Kubernetes gives GPUs by count (nvidia.com/gpu); ask for a number of GPUs, "
                f"not GPU {', '.join(spec.gpus.device_ids)}.",
                code="gpu_unavailable",
            )
        serving = ServingSpec(
            deployment_id=spec.deployment_id,
            revision_id=spec.revision_id,
            model_name=spec.model_name,
            model_version=spec.model_version,
            image=spec.image,
            device=spec.device,
            gpus=spec.gpus.wanted,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
        )
        self.reconcile(serving)
        name = object_name(self.settings, spec.deployment_id)
        host = f"{name}.{self.settings.namespace}.svc"
        return LaunchResult(
            handle=str(Handle(self.settings.namespace, name, str(spec.revision_id))),
            url=f"http://{host}:{SERVING_PORTS['http']}",
            grpc_address=f"{host}:{SERVING_PORTS['grpc']}",
        )

    def _deployment(self, handle: Handle) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        api, _ = self._group("Deployment")
        try:
            obj = api.read_namespaced_deployment(handle.name, handle.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise LaunchError(f"Reading Deployment {handle.name} failed: {exc.reason}") from exc
        found: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return found

    def stop(self, handle: str, *, grace_s: float = 10.0) -> None:
        parsed = Handle.parse(handle)
        current = self._deployment(parsed)
        if current is None:
            return
        running = str((current.get("metadata", {}).get("annotations") or {}).get(REVISION, ""))
        if running != parsed.revision:
            return  # replaced by a later revision's rolling update already
        deployment_id = int(current["metadata"]["labels"][DEPLOYMENT])
        self.apply(plan(None, self._observe(deployment_id)))

    def status(self, handle: str) -> InstanceStatus:
        parsed = Handle.parse(handle)
        current = self._deployment(parsed)
        if current is None:
            return InstanceStatus(InstanceState.MISSING, "the Deployment is gone")
        state = rollout(current, revision=parsed.revision)
        if state.state == RolloutState.FAILED:
            return InstanceStatus(InstanceState.EXITED, self._why(parsed, state.detail))
        if state.state == RolloutState.PROGRESSING:
            problem = pod_problem(self._pods(parsed))
            if problem:
                # A pod that cannot pull its image or keeps crashing will not get better.
                return InstanceStatus(InstanceState.EXITED, self._why(parsed, problem))
        return InstanceStatus(InstanceState.RUNNING, state.detail)

    def _pods(self, handle: Handle) -> list[dict[str, Any]]:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        selector = f"{INSTALLATION}={self.settings.installation},{REVISION}={handle.revision}"
        pods = core.list_namespaced_pod(handle.namespace, label_selector=selector).items
        return [self.api.sanitize_for_serialization(pod) for pod in pods]

    def events(self, handle: str) -> list[str]:
        """The cluster's events for the revision's Deployment, ReplicaSets and pods."""
        from kubernetes import client

        parsed = Handle.parse(handle)
        core = client.CoreV1Api(self.api)
        found = [
            ClusterEvent.of(self.api.sanitize_for_serialization(event))
            for event in core.list_namespaced_event(parsed.namespace).items
        ]

        def of_ours(event: ClusterEvent) -> bool:
            # ReplicaSets and pods are named after their Deployment: <name>-<hash>[-<id>].
            name = event.object.split("/", 1)[-1]
            return name == parsed.name or name.startswith(f"{parsed.name}-")

        ours = [e for e in found if of_ours(e)]
        return events_explained(ours)

    def _why(self, handle: Handle, detail: str) -> str:
        events = self.events(str(handle))
        return detail + (f". Cluster events: {'; '.join(events[:2])}" if events else "")

    def logs(self, handle: str, *, tail: int = 200) -> str:
        from kubernetes import client

        parsed = Handle.parse(handle)
        core = client.CoreV1Api(self.api)
        selector = f"{INSTALLATION}={self.settings.installation},{REVISION}={parsed.revision}"
        pods = core.list_namespaced_pod(parsed.namespace, label_selector=selector).items
        parts = []
        for pod in pods:
            text = core.read_namespaced_pod_log(
                pod.metadata.name, parsed.namespace, container="serving", tail_lines=tail
            )
            parts.append(text)
        events = self.events(handle)
        if events:
            parts.append("Cluster events:\n" + "\n".join(events))
        return "\n".join(parts)

    def owned(self) -> list[OwnedInstance]:
        api, _ = self._group("Deployment")
        selector = f"{INSTALLATION}={self.settings.installation}"
        items = api.list_namespaced_deployment(self.settings.namespace, label_selector=selector)
        owned = []
        for obj in items.items:
            data: Manifest = self.api.sanitize_for_serialization(obj)
            meta = data["metadata"]
            revision = str((meta.get("annotations") or {}).get(REVISION, "0"))
            state = rollout(data, revision=revision).state
            owned.append(
                OwnedInstance(
                    handle=str(Handle(self.settings.namespace, meta["name"], revision)),
                    deployment_id=int(meta["labels"][DEPLOYMENT]),
                    revision_id=int(revision),
                    state=InstanceState.EXITED
                    if state == RolloutState.FAILED
                    else InstanceState.RUNNING,
                )
            )
        return owned
