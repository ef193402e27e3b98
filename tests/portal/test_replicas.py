"""Replicas under load: kill one of two, and not one request fails while it is replaced.

Real parts throughout: the managed nginx (gateway and router), serving instances (local
processes, or containers on the Docker engine), a Celery worker on the deploy queue
(it runs the replacement), the replica watcher process (``manage.py deployments_watch``:
it hears the death from the runtime), PostgreSQL and Redis. Load is about 150 req/s
through the stable address, on loopback, for a bounded time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.accounts.services import key_create
from portal.core import engine
from portal.core.models import Event
from portal.deployments import replicas, services
from portal.deployments.choices import DeploymentStatus, ReplicaState
from portal.deployments.models import Deployment, Replica
from portal.registry import services as registry_services
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion
from tests.conftest import (
    BIN,
    REPO,
    Personas,
    Worker,
    report_entry,
    start_worker,
    wait_for,
)
from tests.onnx_models import linear_model

X = [1.0, 2.0, 3.0, 4.0]
RATE = 150  # requests per second, over all load threads
THREADS = 6


@pytest.fixture
def version(personas: Personas, tmp_path: Path) -> Iterator[tuple[ModelVersion, np.ndarray]]:
    if engine.proxy() is None:
        pytest.skip("no managed nginx here (apt-get install nginx; make test does)")
    model = Model.objects.create(team=personas.acme, name="demo")
    path = tmp_path / "m.onnx"
    weight, bias = linear_model(path, seed=3)
    made = registry_services.version_upload(
        model=model, file=SimpleUploadedFile(path.name, path.read_bytes()), user=personas.bob.user
    )
    registry_services.version_process(version_id=made.pk)
    made.refresh_from_db()
    if made.status == VersionStatus.BUILDING:  # containers: the model image comes next
        registry_services.version_build(version_id=made.pk)
        made.refresh_from_db()
    assert made.is_ready, made.error
    yield made, (np.array([X], dtype=np.float32) @ weight + bias).reshape(-1)
    for runtime in engine.runtimes_in_use():
        for instance in runtime.owned():
            runtime.stop(instance.handle, grace_s=1)


@pytest.fixture
def healing(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Worker]:
    """A deploy worker and the replica watcher, as ``make run`` starts them."""
    worker = start_worker(worker_env, tmp_path / "deploy.log", queues=("deploy",))
    log = tmp_path / "watch.log"
    watcher = subprocess.Popen(
        [str(BIN / "python"), "manage.py", "deployments_watch"],
        cwd=REPO, env=worker_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    wait_for(lambda: "Watching" in log.read_text(errors="replace"), timeout_s=60, what="watcher")
    try:
        yield worker
    finally:
        watcher.send_signal(signal.SIGTERM)
        try:
            watcher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(watcher.pid, signal.SIGKILL)
        worker.stop()


@dataclass
class Load:
    """Paced requests through the stable address from a few threads; every outcome counted."""

    url: str
    headers: dict[str, str]
    want: np.ndarray
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        for _ in range(THREADS):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self.ended = time.monotonic()

    @property
    def rate(self) -> float:
        return (self.ok + len(self.failures)) / max(self.ended - self.started, 1e-9)

    def _run(self) -> None:
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]}
        session = requests.Session()
        period = THREADS / RATE
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                answer = session.post(self.url, json=body, headers=self.headers, timeout=15)
                if answer.status_code != 200:
                    outcome = f"HTTP {answer.status_code}: {answer.text[:200]}"
                else:
                    got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
                    right = np.allclose(got, self.want, rtol=1e-5)
                    outcome = "" if right else f"wrong answer {got}"
            except Exception as exc:  # every failure counts, whatever it is
                outcome = f"{type(exc).__name__}: {exc}"
            with self.lock:
                if outcome:
                    self.failures.append(outcome)
                else:
                    self.ok += 1
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))


def _ready(deployment: Deployment) -> list[Replica]:
    return list(Replica.objects.filter(deployment=deployment, state=ReplicaState.READY))


def _kill_one_under_load(
    personas: Personas,
    version: tuple[ModelVersion, np.ndarray],
    kill: Callable[[Replica], None],
    scenario: str,
) -> dict[str, Any]:
    made, want = version
    first = services.deployment_deploy(
        version=made, name="production", user=personas.bob.user, min_replicas=2
    )
    # The deploy worker rolls it out (the request enqueued it).
    deployment = wait_for(
        lambda: Deployment.objects.filter(
            pk=first.deployment_id, status__in=[DeploymentStatus.RUNNING, DeploymentStatus.FAILED]
        ).first(),
        timeout_s=180, what="the rollout",
    )  # fmt: skip
    assert deployment.status == DeploymentStatus.RUNNING, deployment.error
    two = _ready(deployment)
    assert len(two) == 2
    assert len({r.handle for r in two}) == 2
    route = engine.proxy().routes()[f"d{deployment.pk}"]  # type: ignore[union-attr]
    assert sorted(b.upstream for b in route.servers()) == sorted(
        r.internal_url.removeprefix("http://") for r in two
    )

    _, key = key_create(team=personas.acme, user=personas.bob.user, name="load")
    load = Load(
        url=f"{deployment.endpoint_url}/infer",
        headers={"Authorization": f"Bearer {key}"},
        want=want,
    )
    load.start()
    time.sleep(2)
    victim = two[0]
    killed_at = time.monotonic()
    kill(victim)
    failed = wait_for(
        lambda: Replica.objects.filter(pk=victim.pk, state=ReplicaState.FAILED).first(),
        timeout_s=20, interval_s=0.02, what="the watcher to notice the death",
    )  # fmt: skip
    noticed_s = time.monotonic() - killed_at
    wait_for(
        lambda: len(_ready(deployment)) == 2
        and Deployment.objects.get(pk=deployment.pk).status == DeploymentStatus.RUNNING,
        timeout_s=120, interval_s=0.1, what="a replacement replica",
    )  # fmt: skip
    back_s = time.monotonic() - killed_at
    time.sleep(2)  # the replacement serves under load too
    # Each replica's own traffic, from its metrics port (the watcher reads it every 5 s).
    survivor = wait_for(
        lambda: Replica.objects.filter(pk=two[1].pk, rate_per_s__gt=10, p99_ms__gt=0).first(),
        timeout_s=30, interval_s=0.5, what="the survivor's request rate",
    )  # fmt: skip
    load.finish()

    assert load.failures == [], load.failures[:5]
    assert load.ok > RATE * 3, load.ok
    replacement = next(r for r in _ready(deployment) if r.slot == victim.slot)
    assert replacement.restarts == 1
    assert replacement.handle != victim.handle
    events = [e.message for e in Event.objects.filter(deployment=deployment, step="replica")]
    assert any("SIGKILL" in m and "gets no traffic now" in m for m in events), events
    assert any("is ready" in m and "gets traffic" in m for m in events), events
    route = engine.proxy().routes()[f"d{deployment.pk}"]  # type: ignore[union-attr]
    assert sorted(b.upstream for b in route.servers()) == sorted(
        r.internal_url.removeprefix("http://") for r in _ready(deployment)
    )
    figures = {
        "scenario": scenario,
        "requests": load.ok + len(load.failures),
        "failed": len(load.failures),
        "rate_per_s": round(load.rate, 1),
        "death_noticed_s": round(noticed_s, 3),
        "replica_back_s": round(back_s, 2),
        "cause": failed.cause,
        "survivor_rate_per_s": round(survivor.rate_per_s, 1),
        "survivor_p99_ms": round(survivor.p99_ms, 2),
    }
    report_entry("replicas", figures)
    print(f"\n{scenario}: {figures}")
    return figures


def test_sigkill_one_of_two_local_replicas_under_load_fails_no_request(
    personas: Personas, version: tuple[ModelVersion, np.ndarray], healing: Worker
) -> None:
    def kill(replica: Replica) -> None:
        os.kill(int(replica.handle.split("-")[1]), signal.SIGKILL)

    figures = _kill_one_under_load(personas, version, kill, "local: SIGKILL one of 2 replicas")
    assert figures["cause"] == "killed by signal SIGKILL"


def test_killing_one_containers_process_under_load_fails_no_request(
    docker_mode: None,
    personas: Personas,
    version: tuple[ModelVersion, np.ndarray],
    healing: Worker,
) -> None:
    """The container's main process is SIGKILLed from the host (as the kernel's OOM killer
    or a crash would end it); the engine's ``die`` event tells the watcher."""
    runtime = engine.runtime()

    def kill(replica: Replica) -> None:
        container = runtime.client.containers.get(replica.handle)  # type: ignore[attr-defined]
        os.kill(int(container.attrs["State"]["Pid"]), signal.SIGKILL)

    figures = _kill_one_under_load(
        personas, version, kill, "docker: SIGKILL one container's process of 2 replicas"
    )
    assert figures["cause"] == "killed by signal SIGKILL (exit code 137)"


def _deploy_here(personas: Personas, made: ModelVersion, **kwargs: Any) -> Deployment:
    """Deploy and roll out in this process (no worker: these tests call task bodies)."""
    revision = services.deployment_deploy(
        version=made, name="production", user=personas.bob.user, **kwargs
    )
    services.revision_rollout(revision_id=revision.pk)
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    timeline = list(Event.objects.filter(deployment=deployment).values_list("message", flat=True))
    assert deployment.status == DeploymentStatus.RUNNING, timeline
    return deployment


def _route_upstreams(deployment: Deployment) -> list[str]:
    route = engine.proxy().routes()[f"d{deployment.pk}"]  # type: ignore[union-attr]
    return sorted(b.upstream for b in route.servers())


def test_replicas_are_set_through_the_api_and_the_route_follows(
    personas: Personas, version: tuple[ModelVersion, np.ndarray]
) -> None:
    deployment = _deploy_here(personas, version[0])
    assert (deployment.min_replicas, deployment.max_replicas) == (1, 1)
    url = f"/api/v1/deployments/{deployment.pk}/"

    refused = personas.vera.client().patch(url, {"min_replicas": 2}, format="json")
    assert refused.status_code == 403
    bad = personas.bob.client().patch(url, {"min_replicas": 3, "max_replicas": 2}, format="json")
    assert bad.status_code == 400, bad.content
    assert bad.json()["code"] == "invalid_replicas"
    assert "max_replicas (2) must not be below min_replicas (3)" in bad.json()["detail"]
    too_many = personas.bob.client().patch(url, {"min_replicas": 40}, format="json")
    assert too_many.status_code == 400
    answer = personas.bob.client().patch(url, {"min_replicas": 2}, format="json")
    assert answer.status_code == 200, answer.content
    assert (answer.json()["min_replicas"], answer.json()["max_replicas"]) == (2, 2)

    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 1
    rows = personas.vera.client().get(url).json()["replicas"]
    assert [(r["slot"], r["state"]) for r in rows] == [(0, "ready"), (1, "ready")]
    assert all(r["address"].startswith("http://127.0.0.1:") and r["started_at"] for r in rows)
    assert _route_upstreams(deployment) == sorted(
        r["address"].removeprefix("http://") for r in rows
    )
    # Both serve: the API's address for each answers ready.
    for row in rows:
        assert requests.get(f"{row['address']}/v2/health/ready", timeout=5).status_code == 200

    page = personas.vera.user
    from django.test import Client

    web = Client()
    web.force_login(page)
    fragment = web.get(
        f"/deployments/{deployment.pk}/?part=replicas", HTTP_HX_REQUEST="true"
    ).content.decode()
    assert "2 of 2 ready" in fragment
    assert fragment.count('data-testid="replica-row"') == 2
    assert 'hx-swap-oob="true"' in fragment  # the status badge follows, elsewhere on the page

    answer = personas.bob.client().patch(url, {"min_replicas": 1, "max_replicas": 3}, format="json")
    assert answer.status_code == 200
    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["stopped"] == 1
    [left] = _ready(deployment)
    assert left.slot == 0
    assert _route_upstreams(deployment) == [left.internal_url.removeprefix("http://")]
    steps = list(Event.objects.filter(deployment=deployment, step="scale").values_list("message"))
    assert sorted(m for (m,) in steps) == [
        "Replicas of production: 1..1 → 2..2",
        "Replicas of production: 2..2 → 1..3",
    ]


def test_a_replica_that_keeps_dying_backs_off_and_the_deployment_reads_degraded(
    personas: Personas, version: tuple[ModelVersion, np.ndarray]
) -> None:
    deployment = _deploy_here(personas, version[0])
    runtime = engine.runtime()

    def kill_and_tell() -> Replica:
        [replica] = _ready(deployment)
        os.kill(int(replica.handle.split("-")[1]), signal.SIGKILL)
        ended = wait_for(lambda: runtime.exit_of(replica.handle), timeout_s=20)  # type: ignore[attr-defined]
        # What the watcher does when the pidfd turns readable.
        assert replicas.replica_exited(handle=replica.handle, cause=ended.cause)
        return replica

    kill_and_tell()
    assert Deployment.objects.get(pk=deployment.pk).status == DeploymentStatus.DEGRADED
    # The first death is replaced at once.
    assert replicas.backoff_left(deployment) == 0
    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 1
    assert Deployment.objects.get(pk=deployment.pk).status == DeploymentStatus.RUNNING

    # The second within minutes waits (2 s, then 4, 8 … up to a minute), and says so.
    kill_and_tell()
    wait = replicas.backoff_left(deployment)
    assert 0 < wait <= 2
    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 0
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.DEGRADED
    assert deployment.error == "0 of 1 replicas are ready."
    messages = list(
        Event.objects.filter(deployment=deployment, step="replica").values_list(
            "message", flat=True
        )
    )
    assert any("back-off" in m for m in messages), messages
    assert sum("killed by signal SIGKILL" in m for m in messages) == 2
    api = personas.vera.client().get(f"/api/v1/deployments/{deployment.pk}/").json()
    assert api["status"] == "degraded"
    failed = [r for r in api["replicas"] if r["state"] == "failed"]
    assert [r["cause"] for r in failed] == ["killed by signal SIGKILL"] * 2

    time.sleep(wait)
    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 1
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.RUNNING
    assert [r.restarts for r in _ready(deployment)] == [2]


def test_without_nginx_every_replica_accepts_on_the_handed_over_address(
    personas: Personas, version: tuple[ModelVersion, np.ndarray], settings: Any
) -> None:
    """MODELPORT_PROXY=none: replicas share the deployment's public sockets; new
    connections spread over them, and a replacement joins them on the same address."""
    from deployer.monitoring import scrape_metrics

    settings.MODELPORT_PROXY = "none"
    assert engine.proxy() is None
    made, want = version
    deployment = _deploy_here(personas, made, min_replicas=2)
    endpoint = deployment.endpoint_url
    two = _ready(deployment)
    assert len(two) == 2
    assert all(r.internal_url not in endpoint for r in two)
    _, key = key_create(team=personas.acme, user=personas.bob.user, name="spread")
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]}
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}

    def served(rows: list[Replica]) -> dict[int, float]:
        return {r.slot: scrape_metrics(r.metrics_url).success for r in rows}

    def call_many() -> None:
        for _ in range(60):  # a new connection each: the kernel hands each to one replica
            answer = requests.post(f"{endpoint}/infer", json=body, headers=headers, timeout=10)
            assert answer.status_code == 200, answer.text
            got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5)

    before = served(two)
    call_many()
    after = served(two)
    assert all(after[slot] > before[slot] for slot in after), (before, after)

    victim = two[0]
    os.kill(int(victim.handle.split("-")[1]), signal.SIGKILL)
    runtime = engine.runtime()
    ended = wait_for(lambda: runtime.exit_of(victim.handle), timeout_s=20)  # type: ignore[attr-defined]
    assert replicas.replica_exited(handle=victim.handle, cause=ended.cause)
    call_many()  # the survivor holds the address alone meanwhile
    assert replicas.deployment_replicas_heal(deployment_id=deployment.pk)["started"] == 1
    deployment.refresh_from_db()
    assert deployment.endpoint_url == endpoint
    fresh = _ready(deployment)
    before = served(fresh)
    call_many()
    after = served(fresh)
    assert all(after[slot] > before[slot] for slot in after), (before, after)


def test_a_replica_that_stops_answering_readiness_is_replaced(
    personas: Personas, version: tuple[ModelVersion, np.ndarray], healing: Worker
) -> None:
    """A frozen replica (SIGSTOP: alive, but answering nothing) fails its readiness check
    three times, is taken out of the route, stopped and replaced."""
    made, _ = version
    first = services.deployment_deploy(
        version=made, name="production", user=personas.bob.user, min_replicas=2
    )
    deployment = wait_for(
        lambda: Deployment.objects.filter(
            pk=first.deployment_id, status__in=[DeploymentStatus.RUNNING, DeploymentStatus.FAILED]
        ).first(),
        timeout_s=180, what="the rollout",
    )  # fmt: skip
    assert deployment.status == DeploymentStatus.RUNNING, deployment.error
    victim = _ready(deployment)[0]
    pid = int(victim.handle.split("-")[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        failed = wait_for(
            lambda: Replica.objects.filter(pk=victim.pk, state=ReplicaState.FAILED).first(),
            timeout_s=60, interval_s=0.1, what="the readiness failure",
        )  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert failed.cause.startswith("failed its readiness check 3 times in a row"), failed.cause
    wait_for(
        lambda: len(_ready(deployment)) == 2
        and Deployment.objects.get(pk=deployment.pk).status == DeploymentStatus.RUNNING,
        timeout_s=120, interval_s=0.2, what="a replacement replica",
    )  # fmt: skip
    assert victim.internal_url.removeprefix("http://") not in _route_upstreams(deployment)
    assert engine.runtime().status(victim.handle).state != "running"
