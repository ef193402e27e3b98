"""Async inference end to end: a real local deployment behind its stable address, a real
deploy worker on Redis and PostgreSQL, the dispatcher as its own process, callbacks to a
receiver on loopback. 200 requests are accepted, then the serving instance and, later, the
dispatcher are SIGKILLed while requests are queued; every one of the 200 answers is still
delivered, polled and by callback, each correct and signed with the team's secret."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile

from deployer.async_dispatch import verify
from deployer.cli import main as cli_main
from deployer.runtimes.base import InstanceState
from deployer.serving.async_spool import Spool
from portal.accounts.services import key_create
from portal.deployments import services
from portal.deployments.async_inference import (
    deployment_async_queue,
    spool_path,
    team_callback_secret,
)
from portal.deployments.choices import DeploymentStatus, ReplicaState
from portal.deployments.models import Deployment, Replica
from portal.registry import services as registry_services
from portal.registry.models import Model
from tests.conftest import REPO, Personas, start_worker, wait_for
from tests.onnx_models import linear_model

pytestmark = [pytest.mark.e2e]
COUNT = 200


class _Receiver(http.server.BaseHTTPRequestHandler):
    deliveries: list[tuple[dict[str, str], bytes]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).deliveries.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"deliveries": [], "lock": threading.Lock()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()


class _Dispatcher:
    """``manage.py async_dispatcher`` as its own process (a session, so SIGKILL takes all)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "async_dispatcher"],
            cwd=REPO,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: (
                "async dispatcher ready" in log.read_text(errors="replace")
                or self.process.poll() is not None
            ),
            timeout_s=90,
            what="the async dispatcher to start",
        )
        assert self.process.poll() is None, log.read_text()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _instance_pid(handle: str) -> int:
    return int(handle.split("-")[1])  # local runtime handles are proc-<pid>-<start time>


def _kill_instance(handle: str, mode: str) -> None:
    if mode == "docker":
        from deployer.images import docker_client

        docker_client().containers.get(handle).kill()
    else:  # the serving process itself (its keeper, the parent, records how it ended)
        os.kill(_instance_pid(handle), signal.SIGKILL)


# local: processes behind nginx; handover: processes with no proxy, the stable address a
# listening socket handed from instance to instance (issue 11); docker: containers, nginx.
@pytest.mark.parametrize("mode", ["local", "handover", "docker"])
def test_200_async_requests_survive_killing_the_instance_and_the_dispatcher(
    mode: str,
    request: pytest.FixtureRequest,
    personas: Personas,
    worker_env: dict[str, str],
    receiver: tuple[str, type[_Receiver]],
    tmp_path: Path,
    settings: Any,
    live_server: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    callback_url, handler = receiver
    if mode == "docker":
        request.getfixturevalue("docker_mode")  # containers behind nginx, here and in workers
        worker_env = {**worker_env, "MODELPORT_RUNTIME": "docker"}
    if mode == "handover":
        settings.MODELPORT_PROXY = "none"
        worker_env = {**worker_env, "MODELPORT_PROXY": "none"}
    # The upload is ONNX: validated in a limited child process, no converter image needed.
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_ASYNC_CALLBACK_HOSTS = ["127.0.0.1"]
    settings.MODELPORT_ASYNC_MAX_QUEUE = 1000
    env = {
        **worker_env,
        "MODELPORT_ASYNC_CALLBACK_HOSTS": "127.0.0.1",
        "MODELPORT_ASYNC_LEASE_S": "3",
        "MODELPORT_ASYNC_CONCURRENCY": "2",
        "MODELPORT_RECONCILE_SECONDS": "3600",  # the test reconciles when it means to
    }
    deploy_worker = start_worker(env, tmp_path / "deploy-worker.log", queues=("deploy",))
    dispatchers: list[_Dispatcher] = []
    try:
        model = Model.objects.create(team=personas.acme, name="demo")
        path = tmp_path / "m.onnx"
        weight, bias = linear_model(path, seed=7)
        version = registry_services.version_upload(
            model=model,
            file=SimpleUploadedFile("m.onnx", path.read_bytes()),
            user=personas.bob.user,
        )
        registry_services.version_process(version_id=version.pk)
        if mode == "docker":  # the model image (the convert worker's work), built here
            registry_services.version_build(version_id=version.pk)
        version.refresh_from_db()
        assert version.is_ready, version.error
        revision = services.deployment_deploy(
            version=version, name="production", user=personas.bob.user
        )
        # The deploy worker rolls it out (deployment_deploy enqueued it).
        deployment = wait_for(
            lambda: Deployment.objects.filter(
                pk=revision.deployment_id,
                status__in=[DeploymentStatus.RUNNING, DeploymentStatus.FAILED],
            ).first(),
            timeout_s=180,
            what="the first rollout",
        )
        assert deployment.status == DeploymentStatus.RUNNING, deployment.error
        _key_row, key = key_create(team=personas.acme, user=personas.bob.user, name="app")
        _other_row, other_team_key = key_create(
            team=personas.globex, user=personas.charlie.user, name="theirs"
        )
        secret = team_callback_secret(team=personas.acme).encode()
        infer_url = f"{deployment.endpoint_url}/infer"
        auth = {"Authorization": f"Bearer {key}"}
        session = requests.Session()

        # Another team's key is refused at the stable address, as for a synchronous call.
        body0 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                             "data": [1, 2, 3, 4]}]}  # fmt: skip
        refused = session.post(
            infer_url,
            json=body0,
            headers={"Authorization": f"Bearer {other_team_key}", "Prefer": "respond-async"},
        )
        assert refused.status_code == 401, refused.text

        # 200 requests accepted while no dispatcher runs: all of them queued.
        rng = np.random.default_rng(11)
        expected: dict[str, np.ndarray] = {}
        locations: dict[str, str] = {}
        for _ in range(COUNT):
            x = rng.standard_normal((1, 4)).astype(np.float32)
            doc = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                               "data": x.ravel().tolist()}]}  # fmt: skip
            answer = session.post(
                infer_url,
                json=doc,
                headers={
                    **auth,
                    "Prefer": "respond-async",
                    "ModelPort-Callback-URL": callback_url,
                },
            )
            assert answer.status_code == 202, answer.text
            assert answer.headers["Preference-Applied"] == "respond-async"
            request_id = answer.json()["id"]
            expected[request_id] = (x @ weight + bias).ravel()
            locations[request_id] = urljoin(infer_url, answer.headers["Location"])
        assert len(expected) == COUNT
        assert deployment_async_queue(deployment=deployment).depth == COUNT
        first = next(iter(locations.values()))
        assert first.startswith(deployment.endpoint_url + "/async/")  # through the stable URL
        assert session.get(first, headers=auth).status_code == 202

        spool = Spool(spool_path(deployment.pk))

        def answered() -> int:
            return len(list(spool._entries("done", ".res")))

        # Kill the serving instance: the dispatcher keeps retrying until reconcile has
        # replaced it (the deploy worker runs the restart).
        live = deployment.current_revision
        assert live is not None
        killed = Replica.objects.get(revision=live, state=ReplicaState.READY)
        _kill_instance(killed.handle, mode)
        dispatchers.append(_Dispatcher(env, tmp_path / "dispatcher-1.log"))
        runtime = services._runtime_of(live)
        wait_for(
            lambda: runtime.status(killed.handle).state != InstanceState.RUNNING,
            timeout_s=30,
            what="the killed instance to be seen as gone",
        )
        queued_at_instance_kill = deployment_async_queue(deployment=deployment).depth
        assert queued_at_instance_kill == COUNT  # nothing could be answered with it gone
        counts = services.deployments_reconcile()
        assert counts["restarted"] == 1, counts

        def replaced() -> bool:  # a new replica in the killed one's slot, serving
            return (
                Replica.objects.filter(revision=live, state=ReplicaState.READY)
                .exclude(pk=killed.pk)
                .exists()
            )

        wait_for(replaced, timeout_s=180, what="reconcile to replace the instance")
        assert f"{deployment.endpoint_url}/infer" == infer_url  # the address did not move
        wait_for(lambda: answered() >= 40, timeout_s=120, what="answers after the restart")

        # Kill the dispatcher while requests are queued (and some claimed): its claims go
        # back to the queue after the lease, and the next dispatcher finishes the rest.
        dispatchers[0].kill()
        at_kill = deployment_async_queue(deployment=deployment)
        assert at_kill.depth > 0, "the dispatcher finished before it could be killed"
        assert at_kill.oldest_age_s is not None
        dispatchers.append(_Dispatcher(env, tmp_path / "dispatcher-2.log"))
        wait_for(lambda: answered() == COUNT, timeout_s=180, what="all 200 answers")
        wait_for(
            lambda: {h["ModelPort-Request-Id"] for h, _ in handler.deliveries} >= set(expected),
            timeout_s=120,
            what="all 200 callbacks",
        )

        # Every answer, polled at its Location with the key, is the right one.
        for request_id, location in locations.items():
            polled = session.get(location, headers=auth)
            assert polled.status_code == 200, polled.text
            out = np.array(polled.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(out, expected[request_id], rtol=1e-5, atol=1e-5)
        # And every callback is signed with the team's secret and carries the same answer.
        seen: set[str] = set()
        for headers, payload in list(handler.deliveries):
            assert verify(secret, headers, payload), headers
            request_id = headers["ModelPort-Request-Id"]
            out = np.array(json.loads(payload)["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(out, expected[request_id], rtol=1e-5, atol=1e-5)
            seen.add(request_id)
        assert seen == set(expected)
        final = deployment_async_queue(deployment=deployment)
        assert final.depth == 0

        # The CLI: queue one and wait for it, and fetch an earlier answer by its id.
        request_file = tmp_path / "request.json"
        request_file.write_text(json.dumps(body0))
        common = ["--url", live_server.url, "--token", personas.bob.token, "--json"]
        target = ["infer", "--model", "demo", "--key", key]
        capsys.readouterr()
        code = cli_main([*common, *target, "--data", str(request_file), "--async", "--wait"])
        printed = capsys.readouterr().out
        assert code == 0, printed
        out = np.array(json.loads(printed)["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(out, (np.array([[1, 2, 3, 4]]) @ weight + bias).ravel(),
                                   rtol=1e-5)  # fmt: skip
        some_id = next(iter(expected))
        assert cli_main([*common, *target, "--result", some_id]) == 0
        out = np.array(json.loads(capsys.readouterr().out)["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(out, expected[some_id], rtol=1e-5, atol=1e-5)
        assert cli_main([*common, *target, "--result", "0" * 32]) == 4  # unknown: not found
        with capsys.disabled():
            print(
                f"\nasync ({mode}): {COUNT} accepted;"
                f" instance killed with {queued_at_instance_kill} queued;"
                f" dispatcher killed with {at_kill.depth} queued; {COUNT} polled answers correct;"
                f" {len(handler.deliveries)} callbacks for {len(seen)} requests"
                f" ({len(handler.deliveries) - len(seen)} repeated after the kill)"
            )
    finally:
        for dispatcher in dispatchers:
            dispatcher.stop()
        deploy_worker.stop()
        from portal.core import engine

        runtime = engine.runtime()
        for instance in runtime.owned():
            runtime.stop(instance.handle, grace_s=1)
