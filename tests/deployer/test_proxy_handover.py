"""A stable address without nginx: the public sockets pass from instance to instance.

Real serving processes started by the local runtime; clients keep their connections
(as SDKs do) while the deployment moves to a new instance and back again, and while
the runtime is a fresh object (a restarted portal) reading the same state folder.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from bench.serving.edge import build_sum
from deployer.errors import LaunchError
from deployer.runtimes.base import HandsOverAddress, LaunchResult, LaunchSpec
from deployer.runtimes.local import LocalProcessRuntime
from deployer.serving.listen_socket import bind_public
from tests.conftest import wait_http


@pytest.fixture
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Unix socket paths are short: keep the folder short too.
    folder = tmp_path_factory.mktemp("ho")
    yield folder
    runtime = LocalProcessRuntime(folder)
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=2)


def _spec(model: Path, revision: int) -> LaunchSpec:
    return LaunchSpec(
        deployment_id=1, revision_id=revision, model_name="sum", model_version="1", model_path=model
    )


def _start(runtime: LocalProcessRuntime, model: Path, revision: int) -> LaunchResult:
    launch = runtime.start(_spec(model, revision))
    assert wait_http(f"{launch.url}/v2/health/ready", timeout_s=60), runtime.logs(launch.handle)
    return launch


def test_the_address_survives_deploy_rollback_and_restart_with_no_failed_request(
    state_dir: Path, tmp_path: Path
) -> None:
    model = build_sum(tmp_path / "sum.onnx")
    runtime = LocalProcessRuntime(state_dir, stable_address=True)
    assert isinstance(runtime, HandsOverAddress)
    first = _start(runtime, model, 1)
    runtime.take_over(first.handle)
    url, grpc = first.public_url, first.public_grpc
    assert url
    assert url != first.url  # the instance's own port is for the checks
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}

    stop = threading.Event()
    sent, failures = [0], []
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(f"{url}/v2/models/sum/infer", json=body, timeout=10)
                ok = response.status_code == 200 and response.json()["outputs"][0]["data"] == [6]
                outcome = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                sent[0] += 1
                if outcome:
                    failures.append(outcome)
            time.sleep(0.005)

    def grpc_client() -> None:
        import tritonclient.grpc as grpcclient

        triton = grpcclient.InferenceServerClient(grpc)
        x = np.array([[1, 2, 3]], dtype=np.float32)
        tensor = grpcclient.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                got = float(triton.infer("sum", [tensor], client_timeout=10).as_numpy("y")[0, 0])
                outcome = "" if got == 6.0 else f"wrong answer {got}"
            except Exception as exc:  # every failure counts, whatever it is
                outcome = f"gRPC {type(exc).__name__}: {exc}"
            with lock:
                sent[0] += 1
                if outcome:
                    failures.append(outcome)
            time.sleep(0.005)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    threads.append(threading.Thread(target=grpc_client, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    previous = first
    # A deploy, a rollback, and one more deploy by a restarted portal (a new runtime object).
    for revision, owner in (
        (2, runtime),
        (3, runtime),
        (4, LocalProcessRuntime(state_dir, stable_address=True)),
    ):
        launch = _start(owner, model, revision)
        assert (launch.public_url, launch.public_grpc) == (url, grpc)
        owner.take_over(launch.handle)
        owner.stop(previous.handle, grace_s=5)
        previous = launch
        time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    assert sent[0] > 300
    assert failures == []
    for revision in (1, 2, 3, 4):  # every instance in turn served both protocols
        (log,) = state_dir.glob(f"revision-{revision}-*.log")
        text = log.read_text()
        assert '"path":"/v2/models/sum/infer"' in text
        assert "ModelInfer" in text

    # When every instance is gone, the next one binds the same address again.
    runtime.stop(previous.handle, grace_s=2)
    again = _start(runtime, model, 5)
    runtime.take_over(again.handle)
    assert again.public_url == url
    assert requests.post(f"{url}/v2/models/sum/infer", json=body, timeout=10).status_code == 200


def test_an_instance_serves_its_private_port_only_until_it_takes_over(
    state_dir: Path, tmp_path: Path
) -> None:
    """A new version is checked on its own port; the address keeps answering from the
    old one until the switch (a version that fails its check never takes it)."""
    model = build_sum(tmp_path / "sum.onnx")
    runtime = LocalProcessRuntime(state_dir, stable_address=True)
    first = _start(runtime, model, 1)
    with pytest.raises(requests.Timeout):  # queued: nobody accepts before the take-over
        requests.get(f"{first.public_url}/v2/health/ready", timeout=1)
    runtime.take_over(first.handle)
    second = _start(runtime, model, 2)
    for _ in range(30):  # one accept queue, and only the first instance takes from it
        answer = requests.get(f"{second.public_url}/v2/health/ready", timeout=5)
        assert answer.status_code == 200
    runtime.stop(second.handle, grace_s=2)  # "failed its check": it never took the address
    assert requests.get(f"{first.public_url}/v2/health/ready", timeout=5).status_code == 200


def test_a_taken_port_is_a_clear_launch_error(state_dir: Path, tmp_path: Path) -> None:
    model = build_sum(tmp_path / "sum.onnx")
    runtime = LocalProcessRuntime(state_dir, stable_address=True)
    first = runtime.start(_spec(model, 1))
    host, port = first.public_url.removeprefix("http://").rsplit(":", 1)
    runtime.stop(first.handle, grace_s=2)
    squatter = bind_public(host, int(port))  # another process took the port meanwhile
    try:
        with pytest.raises(LaunchError, match="cannot be bound"):
            runtime.start(_spec(model, 2))
    finally:
        squatter.close()


def test_half_a_handover_setting_is_refused() -> None:
    from deployer.serving.config import ConfigError, load_config
    from deployer.serving.listen_socket import parse_fds

    with pytest.raises(ConfigError, match="listen_fds and handover"):
        load_config(["--model", "m.onnx", "--model-name", "m", "--listen-fds", "3,4"], {})
    with pytest.raises(ValueError, match="HTTP_FD,GRPC_FD"):
        parse_fds("three")


def test_a_descriptor_that_is_not_a_listening_socket_stops_the_instance(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    model = build_sum(tmp_path / "sum.onnx")
    with socket_pair() as (left, _right):
        result = subprocess.run(
            [
                sys.executable, "-m", "deployer.serving", "--model", str(model),
                "--model-name", "sum", "--host", "127.0.0.1",
                "--http-port", str(free_port()), "--grpc-port", "0", "--metrics-port", "0",
                "--listen-fds", f"{left.fileno()},-1", "--handover", str(tmp_path / "c.sock"),
            ],
            pass_fds=[left.fileno()], capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert "is not a listening socket" in result.stderr


@contextlib.contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    with left, right:
        yield left, right
