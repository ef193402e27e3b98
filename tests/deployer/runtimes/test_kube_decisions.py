"""The Kubernetes runtime's decisions, as pure functions from observed state to actions:
deploy, scale, rollback, teardown, and reconcile after a crash."""

from __future__ import annotations

from deployer.runtimes.kube import manifests as m
from deployer.runtimes.kube.decisions import (
    Observed,
    RolloutState,
    Verb,
    plan,
    rollout,
)

SETTINGS = m.KubeSettings(installation="abcd1234")
V3 = m.ServingSpec(
    deployment_id=7,
    revision_id=21,
    model_name="fraud",
    model_version="3",
    image="registry.test/models/model:fraud-3",
)
V4 = m.ServingSpec(
    **{
        **V3.__dict__,
        "revision_id": 22,
        "model_version": "4",
        "image": "registry.test/models/model:fraud-4",
    }
)
NAME = m.object_name(SETTINGS, 7)


def observed(objects: list[m.Manifest]) -> list[Observed]:
    """What the cluster would report after applying these manifests."""
    return [Observed.of(o) for o in objects]


def steps(actions: list) -> list[tuple[str, str]]:
    return [(a.verb.value, a.kind) for a in actions]


def test_first_deploy_creates_policy_service_then_pods() -> None:
    actions = plan(m.desired(SETTINGS, V3), [])
    assert steps(actions) == [
        ("create", "NetworkPolicy"),
        ("create", "Service"),
        ("create", "Deployment"),
    ]
    assert all(a.name == NAME for a in actions)


def test_applying_the_same_revision_again_does_nothing() -> None:
    want = m.desired(SETTINGS, V3)
    assert plan(want, observed(want)) == []


def test_a_new_version_is_one_patch_of_the_deployment_a_rolling_update() -> None:
    actions = plan(m.desired(SETTINGS, V4), observed(m.desired(SETTINGS, V3)))
    assert steps(actions) == [("patch", "Deployment")]
    assert actions[0].reason == f"roll {NAME} from revision 21 to 22"
    (container,) = actions[0].manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == V4.image


def test_a_rollback_is_a_patch_back_to_the_earlier_image_nothing_is_built() -> None:
    back = m.ServingSpec(**{**V3.__dict__, "revision_id": 23})
    actions = plan(m.desired(SETTINGS, back), observed(m.desired(SETTINGS, V4)))
    assert steps(actions) == [("patch", "Deployment")]
    (container,) = actions[0].manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == V3.image


def test_scaling_out_adds_an_autoscaler_and_scaling_back_removes_it() -> None:
    scaled = m.ServingSpec(**{**V3.__dict__, "min_replicas": 2, "max_replicas": 6})
    out = plan(m.desired(SETTINGS, scaled), observed(m.desired(SETTINGS, V3)))
    assert steps(out) == [("patch", "Deployment"), ("create", "HorizontalPodAutoscaler")]
    back = plan(m.desired(SETTINGS, V3), observed(m.desired(SETTINGS, scaled)))
    assert steps(back) == [("patch", "Deployment"), ("delete", "HorizontalPodAutoscaler")]


def test_teardown_deletes_everything_autoscaler_first_pods_last() -> None:
    scaled = m.ServingSpec(**{**V3.__dict__, "min_replicas": 2, "max_replicas": 6})
    actions = plan(None, observed(m.desired(SETTINGS, scaled)))
    assert steps(actions) == [
        ("delete", "HorizontalPodAutoscaler"),
        ("delete", "Deployment"),
        ("delete", "Service"),
        ("delete", "NetworkPolicy"),
    ]
    assert all(a.reason == "the deployment is torn down" for a in actions)
    assert plan(None, []) == []


def test_reconcile_after_a_crash_mid_deploy_creates_only_what_is_missing() -> None:
    # The worker died after the NetworkPolicy and the Service, before the Deployment.
    want = m.desired(SETTINGS, V3)
    actions = plan(want, observed(want[:2]))
    assert steps(actions) == [("create", "Deployment")]


def test_reconcile_after_a_crash_mid_rollout_finishes_the_patch() -> None:
    # The worker died after it read the cluster for v4, before its patch went out.
    have = observed(m.desired(SETTINGS, V3))
    actions = plan(m.desired(SETTINGS, V4), have)
    assert steps(actions) == [("patch", "Deployment")]
    # And a second reconcile after that patch landed does nothing.
    assert plan(m.desired(SETTINGS, V4), observed(m.desired(SETTINGS, V4))) == []


def test_an_object_being_deleted_is_recreated_not_patched() -> None:
    want = m.desired(SETTINGS, V3)
    have = observed(want)
    service = next(o for o in have if o.kind == "Service")
    have[have.index(service)] = Observed(
        service.kind, service.name, service.spec_hash, deleting=True
    )
    assert steps(plan(want, have)) == [("create", "Service")]


def test_someone_elses_edit_is_put_back() -> None:
    want = m.desired(SETTINGS, V3)
    have = [Observed(o.kind, o.name, "edited-by-hand", o.revision) for o in observed(want)]
    assert {a.verb for a in plan(want, have)} == {Verb.PATCH}


def _deployment_status(revision: str, **status: int) -> dict:
    manifest = m.deployment(
        SETTINGS, m.ServingSpec(**{**V3.__dict__, "revision_id": int(revision)})
    )
    manifest["metadata"]["generation"] = 2
    manifest["status"] = {"observedGeneration": 2, **status}
    return manifest


def test_rollout_is_ready_only_when_every_replica_is_new_and_available() -> None:
    done = _deployment_status("21", replicas=1, updatedReplicas=1, availableReplicas=1)
    assert rollout(done, revision="21").state == RolloutState.READY
    surging = _deployment_status("21", replicas=2, updatedReplicas=1, availableReplicas=1)
    state = rollout(surging, revision="21")
    assert state.state == RolloutState.PROGRESSING
    assert state.detail == "1 old replicas still running"
    starting = _deployment_status("21", replicas=1, updatedReplicas=1, availableReplicas=0)
    assert rollout(starting, revision="21").detail == "0 of 1 replicas available"
    stale = _deployment_status("21", replicas=1, updatedReplicas=1, availableReplicas=1)
    stale["status"]["observedGeneration"] = 1
    assert rollout(stale, revision="21").state == RolloutState.PROGRESSING


def test_rollout_fails_on_the_progress_deadline_or_a_replaced_revision() -> None:
    stuck = _deployment_status("21", replicas=2, updatedReplicas=1, availableReplicas=1)
    stuck["status"]["conditions"] = [
        {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "took too long"}
    ]
    assert rollout(stuck, revision="21").state == RolloutState.FAILED
    replaced = _deployment_status("22", replicas=1, updatedReplicas=1, availableReplicas=1)
    verdict = rollout(replaced, revision="21")
    assert verdict.state == RolloutState.FAILED
    assert verdict.detail == "revision 22 is deployed, not 21"


# ---------------------------------------------------------------- events and pod states
# Objects shaped as the API returns them (camelCase, as sanitize_for_serialization gives).


def _event(kind: str, name: str, type_: str, reason: str, message: str, last: str, count: int = 1):
    return {
        "type": type_,
        "reason": reason,
        "message": message,
        "count": count,
        "lastTimestamp": last,
        "involvedObject": {"kind": kind, "name": name},
    }


def test_events_read_back_warnings_first_newest_first() -> None:
    from deployer.runtimes.kube.decisions import ClusterEvent, events_explained

    pod = "mp-x-d7-5c9-abc"
    raw = [
        _event("Pod", pod, "Normal", "Scheduled", "Successfully assigned", "2026-12-01T10:00:00Z"),
        _event("Pod", pod, "Warning", "FailedScheduling",
               "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
               "2026-12-01T10:00:05Z", 4),
        _event("Pod", pod, "Warning", "Unhealthy",
               "Readiness probe failed:   HTTP probe failed with statuscode: 503",
               "2026-12-01T10:01:00Z"),
    ]  # fmt: skip
    lines = events_explained([ClusterEvent.of(e) for e in raw])
    assert lines == [
        "Pod/mp-x-d7-5c9-abc: Unhealthy: Readiness probe failed: HTTP probe failed with "
        "statuscode: 503 (Warning)",
        "Pod/mp-x-d7-5c9-abc: FailedScheduling: 0/3 nodes are available: 3 Insufficient "
        "nvidia.com/gpu. (Warning, 4 times)",
        "Pod/mp-x-d7-5c9-abc: Scheduled: Successfully assigned (Normal)",
    ]
    assert events_explained([ClusterEvent.of(e) for e in raw], limit=1) == lines[:1]


def _pod(name: str, **container: object) -> dict[str, object]:
    return {"metadata": {"name": name}, "status": {"containerStatuses": [container]}}


def test_a_pod_that_cannot_start_says_why() -> None:
    from deployer.runtimes.kube.decisions import pod_problem

    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "reg/m:1"'}
    pull = _pod("p1", state={"waiting": waiting})
    assert pod_problem([pull]) == 'pod p1: ImagePullBackOff: Back-off pulling image "reg/m:1"'
    oom = _pod(
        "p2",
        state={"waiting": {"reason": "ContainerCreating"}},
        lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}},
        restartCount=2,
    )
    assert pod_problem([oom]) == "pod p2: out of memory (OOMKilled, exit code 137)"
    crashed = _pod("p3", state={"running": {}}, lastState={"terminated": {"exitCode": 3}},
                   restartCount=5)  # fmt: skip
    assert pod_problem([crashed]) == "pod p3: the serving process exited with code 3 (5 restarts)"
    fine = _pod("p4", state={"running": {}}, restartCount=0)
    starting = _pod("p5", state={"waiting": {"reason": "ContainerCreating"}})
    assert pod_problem([fine, starting]) == ""
    assert pod_problem([fine, pull]).startswith("pod p1: ImagePullBackOff")
