"""The local-process runtime runs the real serving runtime; checks prove it answers correctly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from deployer.checks import Tolerance, check_known_answer, wait_until_ready
from deployer.errors import LaunchError
from deployer.runtimes.base import InstanceState, LaunchSpec
from deployer.runtimes.local import LocalProcessRuntime
from deployer.samples import save_known_answer
from tests.onnx_models import linear_model


@pytest.fixture
def runtime(tmp_path: Path) -> LocalProcessRuntime:
    runtime = LocalProcessRuntime(tmp_path / "state")
    yield runtime
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=1)


def _spec(model: Path, revision: int = 1) -> LaunchSpec:
    return LaunchSpec(
        deployment_id=7,
        revision_id=revision,
        model_name="demo",
        model_version="1",
        model_path=model,
    )


def _ready(runtime: LocalProcessRuntime, handle: str, url: str) -> float:
    return wait_until_ready(
        url,
        "demo",
        timeout_s=60,
        still_running=lambda: runtime.status(handle).state == InstanceState.RUNNING,
        describe_failure=lambda: runtime.logs(handle),
    )


def test_start_answer_and_stop(runtime: LocalProcessRuntime, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    weight, bias = linear_model(model)
    launch = runtime.start(_spec(model))
    _ready(runtime, launch.handle, launch.url)
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    answer = tmp_path / "ka.npz"
    save_known_answer(answer, {"input": x}, {"output": x @ weight + bias})
    check_known_answer(launch.url, "demo", answer)

    [owned] = runtime.owned()
    assert (owned.deployment_id, owned.revision_id, owned.state) == (7, 1, InstanceState.RUNNING)
    assert "ready" in runtime.logs(launch.handle)

    pid = int(launch.handle.split("-")[1])
    runtime.stop(launch.handle, grace_s=5)
    assert runtime.status(launch.handle).state == InstanceState.MISSING
    assert runtime.owned() == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{launch.url}/v2/health/live", timeout=2)


def test_wrong_known_answer_is_caught(runtime: LocalProcessRuntime, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    weight, bias = linear_model(model)
    launch = runtime.start(_spec(model))
    _ready(runtime, launch.handle, launch.url)
    x = np.ones((2, 4), dtype=np.float32)
    answer = tmp_path / "wrong.npz"
    save_known_answer(answer, {"input": x}, {"output": x @ weight + bias + 0.5})
    with pytest.raises(LaunchError, match=r"differs from the known answer by up to 0\.5"):
        check_known_answer(launch.url, "demo", answer, tolerance=Tolerance())


def test_instance_that_dies_is_reported_exited(
    runtime: LocalProcessRuntime, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    linear_model(model)
    launch = runtime.start(_spec(model))
    _ready(runtime, launch.handle, launch.url)
    os.kill(int(launch.handle.split("-")[1]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while runtime.status(launch.handle).state == InstanceState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert runtime.status(launch.handle).state == InstanceState.EXITED
    assert runtime.owned()[0].state == InstanceState.EXITED


def test_instance_that_cannot_load_fails_readiness_with_its_log(
    runtime: LocalProcessRuntime, tmp_path: Path
) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"not a model")
    launch = runtime.start(_spec(model))
    with pytest.raises(LaunchError) as error:
        _ready(runtime, launch.handle, launch.url)
    assert "exited before it was ready" in str(error.value) or "not ready" in str(error.value)
