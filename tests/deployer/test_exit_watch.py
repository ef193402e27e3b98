"""Local instances: their keeper records how they ended, and the watcher hears it from a
pidfd at once (no poll): a SIGKILL names the signal, a crash names the exit code."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from deployer.runtimes.base import InstanceExit, InstanceState, LaunchSpec
from deployer.runtimes.local import LocalProcessRuntime
from deployer.runtimes.watch import watch_exits
from tests.onnx_models import linear_model


@pytest.fixture
def runtime(tmp_path: Path) -> LocalProcessRuntime:
    runtime = LocalProcessRuntime(tmp_path / "state")
    yield runtime
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=1)


def _spec(model: Path, replica: int) -> LaunchSpec:
    return LaunchSpec(
        deployment_id=4, revision_id=9, model_name="demo", model_version="1",
        model_path=model, replica_id=replica,
    )  # fmt: skip


def _wait(predicate: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_killed_and_a_crashed_instance_are_told_with_their_cause(
    runtime: LocalProcessRuntime, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    linear_model(model)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    heard: list[tuple[float, InstanceExit]] = []
    stop = threading.Event()
    threads = watch_exits([runtime], lambda ended: heard.append((time.monotonic(), ended)), stop)
    try:
        launch = runtime.start(_spec(model, replica=11))

        def ready() -> bool:
            try:
                return requests.get(f"{launch.url}/v2/health/ready", timeout=2).ok
            except requests.RequestException:
                return False

        _wait(ready)
        [owned] = runtime.owned()
        assert (owned.replica_id, owned.state) == (11, InstanceState.RUNNING)
        # The handle names the serving process itself, not its keeper.
        pid = int(launch.handle.split("-")[1])
        assert "deployer.serving" in Path(f"/proc/{pid}/cmdline").read_text()
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: heard, timeout_s=20)
        told_at, ended = heard[0]
        assert (ended.handle, ended.replica_id, ended.deployment_id) == (launch.handle, 11, 4)
        assert (ended.signal, ended.exit_code) == ("SIGKILL", None)
        assert ended.cause == "killed by signal SIGKILL"
        assert runtime.status(launch.handle).detail.endswith("killed by signal SIGKILL")
        print(f"\nSIGKILL told after {told_at - killed_at:.3f} s")

        crashed = runtime.start(_spec(broken, replica=12))
        _wait(lambda: len(heard) == 2, timeout_s=60)
        ended = heard[1][1]
        assert ended.handle == crashed.handle
        assert ended.signal == ""
        assert ended.exit_code not in (None, 0)
        assert ended.cause == f"exited with code {ended.exit_code}"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
