"""What to create, patch and delete: pure functions from observed state to actions.

The runtime reads what the cluster has for one deployment (``Observed``), asks
``plan`` what to do to reach the manifests it wants (or nothing, for a teardown), and
applies the actions in order. Every decision (deploy, scale, rollback, teardown,
reconcile after a crash) is therefore a function a test can call without a cluster.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from deployer.runtimes.kube.manifests import KIND_ORDER, REVISION, SPEC_HASH, Manifest


class Verb(enum.StrEnum):
    CREATE = "create"
    PATCH = "patch"
    DELETE = "delete"


@dataclass(frozen=True)
class Observed:
    """One object of a deployment as the cluster has it."""

    kind: str
    name: str
    spec_hash: str = ""
    revision: str = ""
    deleting: bool = False

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Observed:
        """From an object read from the API (``to_dict()`` or raw JSON, camelCase keys)."""
        meta = obj.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        return cls(
            kind=str(obj.get("kind", "")),
            name=str(meta.get("name", "")),
            spec_hash=str(annotations.get(SPEC_HASH, "")),
            revision=str(annotations.get(REVISION, "")),
            deleting=bool(meta.get("deletionTimestamp") or meta.get("deletion_timestamp")),
        )


@dataclass(frozen=True)
class Action:
    """One call to the API, and why."""

    verb: Verb
    kind: str
    name: str
    manifest: Manifest | None
    reason: str


def _rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def plan(want: list[Manifest] | None, have: list[Observed]) -> list[Action]:
    """The actions that turn ``have`` into ``want`` (``None``: remove everything).

    Objects that match their manifest (same spec hash) are left alone, so applying a plan
    twice is harmless; objects of the deployment that nothing wants any more (an
    autoscaler after max = min, leftovers of a crash) are deleted; objects being deleted
    are waited for, not patched.
    """
    by_key = {(o.kind, o.name): o for o in have}
    actions: list[Action] = []
    wanted_keys = set()
    for manifest in want or []:
        kind, name = str(manifest["kind"]), str(manifest["metadata"]["name"])
        wanted_keys.add((kind, name))
        current = by_key.get((kind, name))
        new_hash = str(manifest["metadata"].get("annotations", {}).get(SPEC_HASH, ""))
        if current is None:
            actions.append(Action(Verb.CREATE, kind, name, manifest, f"{kind} {name} is missing"))
        elif current.deleting:
            actions.append(
                Action(
                    Verb.CREATE,
                    kind,
                    name,
                    manifest,
                    f"{kind} {name} is being deleted: recreate it",
                )
            )
        elif current.spec_hash != new_hash:
            why = f"{kind} {name} differs from its manifest"
            new_revision = str(manifest["metadata"].get("annotations", {}).get(REVISION, ""))
            if kind == "Deployment" and current.revision and new_revision != current.revision:
                why = f"roll {name} from revision {current.revision} to {new_revision}"
            actions.append(Action(Verb.PATCH, kind, name, manifest, why))
    leftovers = [o for o in have if (o.kind, o.name) not in wanted_keys and not o.deleting]
    for obj in sorted(leftovers, key=lambda o: -_rank(o.kind)):
        why = (
            "the deployment is torn down"
            if want is None
            else f"nothing wants {obj.kind} {obj.name}"
        )
        actions.append(Action(Verb.DELETE, obj.kind, obj.name, None, why))
    creates = sorted((a for a in actions if a.verb != Verb.DELETE), key=lambda a: _rank(a.kind))
    return [*creates, *(a for a in actions if a.verb == Verb.DELETE)]


class RolloutState(enum.StrEnum):
    READY = "ready"
    PROGRESSING = "progressing"
    FAILED = "failed"


@dataclass(frozen=True)
class Rollout:
    """Where a Deployment's rolling update stands."""

    state: RolloutState
    detail: str


def rollout(deployment: dict[str, Any], *, revision: str) -> Rollout:
    """Whether ``revision`` is fully rolled out: every replica updated and available,
    the controller has seen the latest spec, and no old pod still serves."""
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    running = str((meta.get("annotations") or {}).get(REVISION, ""))
    if running != revision:
        return Rollout(
            RolloutState.FAILED, f"revision {running or '?'} is deployed, not {revision}"
        )
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return Rollout(
                RolloutState.FAILED, str(condition.get("message") or "progress deadline exceeded")
            )
    generation = int(meta.get("generation") or 0)
    observed = int(status.get("observedGeneration") or status.get("observed_generation") or 0)
    replicas = spec.get("replicas")
    wanted = 1 if replicas is None else int(replicas)
    updated = int(status.get("updatedReplicas") or status.get("updated_replicas") or 0)
    available = int(status.get("availableReplicas") or status.get("available_replicas") or 0)
    total = int(status.get("replicas") or 0)
    if observed < generation:
        return Rollout(RolloutState.PROGRESSING, "the controller has not seen the new spec yet")
    if updated < wanted:
        return Rollout(RolloutState.PROGRESSING, f"{updated} of {wanted} replicas updated")
    if total > updated:
        return Rollout(RolloutState.PROGRESSING, f"{total - updated} old replicas still running")
    if available < wanted:
        return Rollout(RolloutState.PROGRESSING, f"{available} of {wanted} replicas available")
    return Rollout(RolloutState.READY, f"{available} replicas of revision {revision} available")


# Why pods of a rollout do not become ready, as the cluster says it: container states
# first (they name the cause: CrashLoopBackOff, ImagePullBackOff, OOMKilled), then the
# newest Warning events of the revision's pods and ReplicaSets (FailedScheduling for a
# GPU or memory the nodes lack, probe failures, quota).
_WAITING_PROBLEMS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class ClusterEvent:
    """One Kubernetes Event, as much of it as a person needs."""

    type: str  # Normal or Warning
    reason: str
    message: str
    object: str  # "Pod/name"
    count: int
    last_seen: str  # RFC 3339, as the API gives it ("" when unknown)

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ClusterEvent:
        """From a core/v1 Event read from the API (camelCase or snake_case keys)."""
        involved = obj.get("involvedObject") or obj.get("involved_object") or {}
        last = (
            obj.get("lastTimestamp")
            or obj.get("last_timestamp")
            or obj.get("eventTime")
            or obj.get("event_time")
            or (obj.get("metadata") or {}).get("creationTimestamp")
            or ""
        )
        return cls(
            type=str(obj.get("type") or "Normal"),
            reason=str(obj.get("reason") or ""),
            message=" ".join(str(obj.get("message") or "").split()),
            object=f"{involved.get('kind', '?')}/{involved.get('name', '?')}",
            count=int(obj.get("count") or 1),
            last_seen=str(last),
        )

    def line(self) -> str:
        times = f", {self.count} times" if self.count > 1 else ""
        return f"{self.object}: {self.reason}: {self.message} ({self.type}{times})"


def events_explained(events: list[ClusterEvent], *, limit: int = 5) -> list[str]:
    """The events worth showing: warnings first, each group newest first."""

    def newest_first(kind: bool) -> list[ClusterEvent]:
        chosen = [e for e in events if (e.type == "Warning") == kind]
        return sorted(chosen, key=lambda e: e.last_seen, reverse=True)

    return [event.line() for event in [*newest_first(True), *newest_first(False)][:limit]]


def pod_problem(pods: list[dict[str, Any]]) -> str:
    """The first container problem among ``pods`` (core/v1 Pod objects), or ""."""
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        containers = status.get("containerStatuses") or status.get("container_statuses") or []
        for container in containers:
            state = container.get("state") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in _WAITING_PROBLEMS:
                message = " ".join(str(waiting.get("message") or "").split())
                return f"pod {name}: {waiting['reason']}" + (f": {message}" if message else "")
            last = (container.get("lastState") or container.get("last_state") or {}).get(
                "terminated"
            ) or {}
            terminated = state.get("terminated") or last
            code = terminated.get("exitCode", terminated.get("exit_code"))
            if terminated.get("reason") == "OOMKilled":
                return f"pod {name}: out of memory (OOMKilled, exit code {code})"
            if code not in (None, 0):
                restarts = int(container.get("restartCount") or container.get("restart_count") or 0)
                return (
                    f"pod {name}: the serving process exited with code {code} ({restarts} restarts)"
                )
    return ""
