"""Versions as model images, deployments as hardened containers behind nginx (real engine)."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from bench.deploy.load import Load
from deployer.images import docker_client
from deployer.proxy import REVISION_HEADER
from deployer.runtimes.base import InstanceState
from deployer.runtimes.docker import MANAGED, NO_GPU_RUNTIME
from portal.core import engine
from portal.core.models import Event
from portal.deployments import replicas, selectors, services
from portal.deployments.choices import (
    DeploymentStatus,
    ReplicaState,
    RevisionKind,
    RevisionStatus,
)
from portal.deployments.models import Deployment, Replica
from portal.registry import services as registry_services
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas, _stop_containers_and_proxy, wait_for
from tests.onnx_models import linear_model
from tests.portal.factories import inference_headers

MIB = 1024 * 1024
X = [1.0, 2.0, 3.0, 4.0]
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]}


def _version(model: Model, path: Path, user: Any) -> ModelVersion:
    version = registry_services.version_upload(
        model=model, file=SimpleUploadedFile(path.name, path.read_bytes()), user=user
    )
    registry_services.version_process(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.BUILDING, version.error
    registry_services.version_build(version_id=version.pk)
    version.refresh_from_db()
    assert version.is_ready, version.error
    return version


@pytest.fixture
def docker_versions(
    docker_mode: None, personas: Personas, tmp_path: Path
) -> Iterator[list[tuple[ModelVersion, np.ndarray, np.ndarray]]]:
    model = Model.objects.create(team=personas.acme, name="demo")
    made = []
    for _ in range(2):
        path = tmp_path / f"m{len(made)}.onnx"
        # Fresh weights every run: the image is new content, so it is really built.
        weight, bias = linear_model(path, seed=random.randrange(1 << 30))
        made.append((_version(model, path, personas.bob.user), weight, bias))
    yield made
    _stop_containers_and_proxy(Path(settings.DATA_DIR))
    client = docker_client()
    for version, _, _ in made:
        for ref in {version.image_ref, *version.report.get("images", {}).values()}:
            with contextlib.suppress(Exception):
                client.images.remove(ref, force=True)


def _deploy(version: ModelVersion, user: Any, **kwargs: Any) -> Deployment:
    revision = services.deployment_deploy(version=version, name="production", user=user, **kwargs)
    services.revision_rollout(revision_id=revision.pk)
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert deployment.status == DeploymentStatus.RUNNING, deployment.error
    return deployment


def _infer(endpoint: str) -> np.ndarray:
    response = requests.post(
        f"{endpoint}/infer", json=BODY, timeout=10, headers=inference_headers(endpoint)
    )
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"])


def test_upload_builds_a_model_image_and_deploys_a_hardened_container(
    personas: Personas, docker_versions: list
) -> None:
    from mlflow import MlflowClient

    (v1, w1, b1), _ = docker_versions
    model_bytes = v1.size_bytes

    # The building step: a content-tagged image, its figures on the version and in MLflow.
    # Tagged by the served model's content (the onnxruntime-optimized file, not the upload).
    assert v1.served_model_path is not None
    served_sha = registry_services.file_sha256(v1.served_model_path)
    assert v1.image_ref.startswith(f"modelport/model:{served_sha[:16]}-cpu-")
    figures = v1.report["image"]
    assert figures["image_model_layer_bytes"] <= model_bytes + MIB
    assert figures["image_size_bytes"] > figures["image_model_layer_bytes"]
    steps = list(Event.objects.filter(version=v1).values_list("step", flat=True))
    assert "build" in steps
    assert steps.index("build") > steps.index("register")
    assert (v1.storage_dir / "build.log").read_text().count("Step ") >= 3
    run = MlflowClient(settings.MLFLOW_TRACKING_URI).get_run(v1.mlflow_run_id)
    assert run.data.metrics["image_size_bytes"] == figures["image_size_bytes"]
    assert run.data.tags["modelport_image"] == v1.image_ref

    deployment = _deploy(v1, personas.bob.user, memory_mb=512)
    revision = deployment.current_revision
    assert revision is not None
    assert revision.runtime == "docker"
    # One stable URL, served by nginx, that names the team, model and deployment.
    assert deployment.endpoint_url == (
        f"{settings.MODELPORT_PROXY_URL}/acme/demo/production/v2/models/demo"
    )
    np.testing.assert_allclose(_infer(deployment.endpoint_url), np.array(X) @ w1 + b1, rtol=1e-5)

    attrs = docker_client().containers.get(revision.handle).attrs
    host = attrs["HostConfig"]
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["Config"]["Image"] == v1.image_ref
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["CapAdd"] in (None, [])
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["Memory"] == 512 * MIB
    assert host["MemorySwap"] == 512 * MIB
    assert host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 256
    assert set(host["Tmpfs"]) == {"/tmp"}
    # The two host folders: this deployment's keys, read-only (the runtime re-reads the
    # file), and its async spool, read-write.
    from portal.deployments.async_inference import spool_path
    from portal.deployments.inference_keys import keys_file_path

    keys_folder = keys_file_path(deployment.pk).parent
    spool = spool_path(deployment.pk)
    assert sorted(host["Binds"]) == sorted(
        [f"{keys_folder}:/modelport-keys:ro", f"{spool}:/modelport-async:rw"]
    )
    assert sorted((m["Source"], m["Destination"], m["RW"]) for m in attrs["Mounts"]) == sorted(
        [(str(keys_folder), "/modelport-keys", False), (str(spool), "/modelport-async", True)]
    )
    assert "docker.sock" not in str(attrs)
    labels = attrs["Config"]["Labels"]
    assert labels[MANAGED] == settings.MODELPORT_INSTALLATION_ID
    assert labels["modelport.deployment"] == str(deployment.pk)
    assert labels["modelport.revision"] == str(revision.pk)
    # Published on loopback only.
    for bindings in attrs["NetworkSettings"]["Ports"].values():
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}

    # Logs come from the shipper's files: no Docker socket is needed to read them.
    _, lines = wait_for(
        lambda: (lambda r: r if "ready" in r[1] else None)(
            selectors.deployment_log_lines(deployment=deployment, tail=50)
        ),
        timeout_s=20,
        what="the shipped container log",
    )
    assert '"event": "ready"' in lines


def test_logs_are_read_without_the_docker_socket(
    personas: Personas, docker_versions: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    (v1, _, _), _ = docker_versions
    deployment = _deploy(v1, personas.bob.user)
    wait_for(
        lambda: "ready" in selectors.deployment_log_lines(deployment=deployment)[1],
        timeout_s=20,
        what="the shipped container log",
    )
    # As in the web process: an engine that cannot be reached must not matter.
    with monkeypatch.context() as patched:
        patched.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        response = personas.vera.client().get(f"/api/v1/deployments/{deployment.pk}/logs?tail=20")
    assert response.status_code == 200, response.content
    assert "ready" in str(response.json())

    # Follow: the tail, then the lines the instance writes while the stream is open.
    marker = f"follow-{uuid.uuid4().hex[:8]}"

    def request_later() -> None:
        time.sleep(1.5)
        requests.get(f"{deployment.endpoint_url}/versions/{marker}", timeout=10)

    later = threading.Thread(target=request_later)
    later.start()
    with monkeypatch.context() as patched:
        patched.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        started = time.monotonic()
        stream = personas.vera.client().get(
            f"/api/v1/deployments/{deployment.pk}/logs",
            {"follow": "true", "tail": 3, "seconds": 5},
            HTTP_ACCEPT="text/plain",
        )
        assert stream.status_code == 200
        assert stream["Content-Type"].startswith("text/plain")
        text = b"".join(stream.streaming_content).decode()
        seconds = time.monotonic() - started
    later.join()
    lines = text.splitlines()
    assert len(lines) >= 4  # the 3-line tail, then what came after
    assert marker not in "".join(lines[:3])
    assert any(marker in line for line in lines[3:]), text
    assert 4 <= seconds < 15  # it ended by itself at ``seconds``


def test_rollout_and_rollback_under_load_drop_no_request(
    personas: Personas, docker_versions: list
) -> None:
    (v1, w1, b1), (v2, w2, b2) = docker_versions
    first = float((np.array(X) @ w1 + b1)[0])
    second = float((np.array(X) @ w2 + b2)[0])
    deployment = _deploy(v1, personas.bob.user)
    # The load generator sends no key: this deployment is public (and stays so across switches).
    services.deployment_public_set(deployment=deployment, public=True, user=personas.alice.user)
    url = f"{deployment.endpoint_url}/infer"

    with Load(url, BODY, rate=150, threads=6) as load:
        time.sleep(1.5)
        rollout = services.deployment_deploy(version=v2, name="production", user=personas.bob.user)
        services.revision_rollout(revision_id=rollout.pk)
        time.sleep(1.5)
        started = time.monotonic()
        back = services.deployment_rollback(
            deployment=deployment, to_version=v1, user=personas.alice.user
        )
        services.revision_rollout(revision_id=back.pk)
        rollback_s = time.monotonic() - started
        time.sleep(1.5)
    result = load.result

    print(
        f"\nload: {result.sent} requests in {result.seconds:.1f} s ({result.rate:.0f} req/s), "
        f"{len(result.failures)} failed; rollback took {rollback_s:.2f} s"
    )
    assert result.failures == []
    assert result.rate >= 100
    # Answers went v1 -> v2 -> v1, never anything else.
    assert set(result.answers) == {round(first, 4), round(second, 4)}
    served = [round(value, 4) for _, value in result.timeline]
    changes = [served[0]] + [b for a, b in itertools.pairwise(served) if a != b]
    assert changes[0] == round(first, 4)
    assert changes[-1] == round(first, 4)
    assert round(second, 4) in changes
    assert rollback_s < 10

    deployment.refresh_from_db()
    back.refresh_from_db()
    assert deployment.current_revision_id == back.pk
    assert back.kind == RevisionKind.ROLLBACK
    assert back.requested_by == personas.alice.user
    # The rollback ran v1's existing image; nothing was built for it.
    assert docker_client().containers.get(back.handle).attrs["Config"]["Image"] == v1.image_ref
    assert not Event.objects.filter(version=v1, step="build", created_at__gt=rollout.created_at)
    # Exactly one container is left: the live one.
    owned = engine.runtime().owned()
    assert [i.handle for i in owned] == [back.handle], (owned, back.pk, rollout.pk)
    history = list(
        deployment.revisions.order_by("id").values_list("version__number", "status", "kind")
    )
    assert history == [
        (1, "superseded", "deploy"),
        (2, "superseded", "deploy"),
        (1, "live", "rollback"),
    ]


def test_failed_new_version_leaves_the_old_container_serving(
    personas: Personas, docker_versions: list
) -> None:
    (v1, w1, b1), (v2, _, _) = docker_versions
    deployment = _deploy(v1, personas.bob.user)
    inputs = dict(np.load(v2.known_answer_path))
    inputs["output:output"] = inputs["output:output"] + 1.0
    np.savez(v2.known_answer_path, **inputs)

    second = services.deployment_deploy(version=v2, name="production", user=personas.bob.user)
    services.revision_rollout(revision_id=second.pk)
    deployment.refresh_from_db()
    second.refresh_from_db()
    assert second.status == RevisionStatus.FAILED
    assert deployment.status == DeploymentStatus.RUNNING
    assert "Version 1 keeps serving" in deployment.error
    np.testing.assert_allclose(_infer(deployment.endpoint_url), np.array(X) @ w1 + b1, rtol=1e-5)
    response = requests.get(deployment.endpoint_url.rsplit("/v2/", 1)[0] + "/v2/health/ready")
    assert response.headers[REVISION_HEADER] == str(deployment.current_revision_id)
    assert engine.runtime().status(second.handle).state == InstanceState.MISSING


def test_gpu_deployment_is_refused_plainly_on_an_engine_without_nvidia(
    personas: Personas, docker_versions: list
) -> None:
    client = docker_client()
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime; the refusal cannot be shown here")
    (v1, _, _), _ = docker_versions
    images_before = {i.id for i in client.images.list()}

    # The deploy worker checks before anything is built or started, and says why.
    revision = services.deployment_deploy(
        version=v1, name="gpu", user=personas.bob.user, device="gpu"
    )
    services.revision_rollout(revision_id=revision.pk)
    revision.refresh_from_db()
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert revision.status == RevisionStatus.FAILED
    assert deployment.status == DeploymentStatus.FAILED
    assert NO_GPU_RUNTIME in deployment.error
    assert "could not select device driver" not in deployment.error
    assert revision.handle == ""
    ours = f"{MANAGED}={settings.MODELPORT_INSTALLATION_ID}"
    assert not client.containers.list(all=True, filters={"label": ours})
    assert {i.id for i in client.images.list()} == images_before

    # What it found is recorded, so the web process refuses the next request at once.
    response = personas.bob.client().post(
        f"/api/v1/models/demo/versions/{v1.number}/deploy",
        {"deployment": "gpu2", "device": "gpu"},
        format="json",
    )
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "gpu_unavailable"
    assert "NVIDIA Container Toolkit" in response.json()["detail"]


def test_reconcile_restarts_dead_containers_and_never_touches_others(
    personas: Personas, docker_versions: list
) -> None:
    (v1, w1, b1), _ = docker_versions
    deployment = _deploy(v1, personas.bob.user)
    client = docker_client()
    live = deployment.current_revision
    assert live is not None

    # Someone else's container on the same engine, even one with look-alike labels.
    foreign = client.containers.run(
        v1.image_ref,
        entrypoint=["sleep", "300"],
        detach=True,
        labels={MANAGED: "someoneelse", "modelport.deployment": str(deployment.pk)},
    )
    # Our own orphan (a revision no row knows).
    orphan = engine.runtime().start(
        _spec(deployment, v1, revision_id=987654)  # no such revision
    )
    try:
        client.containers.get(live.handle).kill()
        counts = services.deployments_reconcile()
        assert counts["orphans_stopped"] == 1
        assert counts["restarted"] == 1
        # The dead replica is replaced in its slot; the revision stays live.
        dead = Replica.objects.get(revision=live)
        assert dead.state == ReplicaState.FAILED
        assert "exit code 137" in dead.cause, dead.cause
        assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 1
        deployment.refresh_from_db()
        assert deployment.current_revision_id == live.pk
        assert deployment.status == DeploymentStatus.RUNNING
        np.testing.assert_allclose(
            _infer(deployment.endpoint_url), np.array(X) @ w1 + b1, rtol=1e-5
        )
        assert engine.runtime().status(orphan.handle).state == InstanceState.MISSING
        foreign.reload()
        assert foreign.status == "running"
        engine.runtime().stop(foreign.id)  # not ours: a no-op
        foreign.reload()
        assert foreign.status == "running"
        assert Event.objects.filter(deployment=deployment, message__contains="is gone").exists()
    finally:
        foreign.remove(force=True)


def _spec(deployment: Deployment, version: ModelVersion, *, revision_id: int) -> Any:
    from deployer.runtimes.base import LaunchSpec

    assert version.served_model_path is not None
    return LaunchSpec(
        deployment_id=deployment.pk,
        revision_id=revision_id,
        model_name="demo",
        model_version=str(version.number),
        model_path=version.served_model_path,
        image=version.image_ref,
    )


def test_a_container_that_runs_out_of_memory_says_so(
    personas: Personas, docker_versions: list
) -> None:
    (v1, _, _), _ = docker_versions
    # Python and onnxruntime alone need more than this: the engine kills it while loading.
    revision = services.deployment_deploy(
        version=v1, name="tiny", user=personas.bob.user, memory_mb=24
    )
    services.revision_rollout(revision_id=revision.pk)
    revision.refresh_from_db()
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert revision.status == RevisionStatus.FAILED
    assert deployment.status == DeploymentStatus.FAILED
    assert "ran out of memory" in deployment.error, deployment.error
    assert engine.runtime().owned() == []


def test_a_dead_container_that_cannot_be_restarted_fails_the_deployment(
    personas: Personas, docker_versions: list
) -> None:
    (v1, _, _), _ = docker_versions
    deployment = _deploy(v1, personas.bob.user)
    live = deployment.current_revision
    assert live is not None
    docker_client().containers.get(live.handle).kill()
    # The restarted instance will answer, but not what was recorded.
    inputs = dict(np.load(v1.known_answer_path))
    inputs["output:output"] = inputs["output:output"] + 1.0
    np.savez(v1.known_answer_path, **inputs)

    assert services.deployments_reconcile()["restarted"] == 1
    counts = replicas.deployment_replicas_heal(deployment_id=deployment.pk)
    assert (counts["started"], counts["failed"]) == (0, 1)
    deployment.refresh_from_db()
    # It stays on its version and says it is short of replicas (the next try backs off).
    assert deployment.status == DeploymentStatus.DEGRADED
    assert deployment.current_revision_id == live.pk
    assert deployment.error == "0 of 1 replicas are ready."
    assert (
        Event.objects.filter(deployment=deployment, message__contains="could not be replaced")
        .filter(message__contains="differs from the known answer")
        .exists()
    )
    assert engine.runtime().owned() == []
    # Nothing serves: the edge answers its own V2 error, not a dying instance's.
    response = requests.get(deployment.endpoint_url, timeout=5)
    assert response.status_code == 503
    assert "no instance answers" in response.json()["error"]
