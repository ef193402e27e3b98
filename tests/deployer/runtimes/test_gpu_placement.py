"""GPU placement: an instance gets only the GPUs it asked for, free ones, or a refusal
that names who holds them. The engine side is a recording client here: this machine has
no GPU and no NVIDIA runtime (the GPU host runs bench/gpu)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deployer.runtimes.base import LaunchSpec
from deployer.runtimes.docker import GPUS, MANAGED, DockerRuntime, DockerSettings
from deployer.runtimes.gpus import (
    GpuPlacementError,
    GpuRequest,
    parse_inventory,
    place,
    placement_lock,
)


def test_a_count_takes_the_first_free_gpus_and_ids_take_exactly_those() -> None:
    inventory = ("0", "1", "2", "3")
    in_use = {"0": "deployment 4 revision 9"}
    assert place(inventory, in_use, GpuRequest(count=2)) == ("1", "2")
    assert place(inventory, in_use, GpuRequest.parse(1, "3, 2")) == ("3", "2")
    assert place(inventory, {}, GpuRequest()) == ("0",)


def test_refusals_say_what_was_asked_what_is_free_and_who_holds_the_rest() -> None:
    inventory = ("0", "1")
    in_use = {"0": "deployment 4 revision 9", "1": "deployment 5 revision 2"}
    with pytest.raises(GpuPlacementError) as busy:
        place(inventory, in_use, GpuRequest(count=1))
    assert str(busy.value) == (
        "1 GPU asked for, 0 free of 2 (in use: GPU 0: deployment 4 revision 9; "
        "GPU 1: deployment 5 revision 2)."
    )
    assert busy.value.code == "gpu_unavailable"
    with pytest.raises(GpuPlacementError, match="GPU 1 is used by deployment 5 revision 2"):
        place(inventory, in_use, GpuRequest.parse(1, "1"))
    with pytest.raises(
        GpuPlacementError, match=r"GPU 7 does not exist on this host \(it has 0, 1\)"
    ):
        place(inventory, {}, GpuRequest.parse(1, "7"))
    with pytest.raises(GpuPlacementError, match="No GPUs are known on this host"):
        place((), {}, GpuRequest())


@pytest.mark.parametrize(
    ("count", "ids", "message"),
    [
        (0, "", "asks for 1 to 64 GPUs, not 0"),
        (1, "0,0", "GPU ids are repeated"),
        (1, "0;rm -rf", "is not a GPU device id"),
    ],
)
def test_a_bad_request_is_refused_before_anything_starts(
    count: int, ids: str, message: str
) -> None:
    with pytest.raises(GpuPlacementError, match=message):
        GpuRequest.parse(count, ids)


def test_an_inventory_setting_is_checked() -> None:
    assert parse_inventory("0, 1,GPU-0a1b2c3d-0000-1111-2222-333344445555") == (
        "0",
        "1",
        "GPU-0a1b2c3d-0000-1111-2222-333344445555",
    )
    with pytest.raises(GpuPlacementError, match="not a GPU device id"):
        parse_inventory("0,all")


class _Container:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels


class _Engine:
    """Answers like an engine with the NVIDIA runtime; records the create call."""

    def __init__(self, running: list[_Container]) -> None:
        self.running = running
        self.created: dict[str, Any] = {}
        self.containers = self

    def info(self) -> dict[str, Any]:
        return {"Runtimes": {"runc": {}, "nvidia": {}}}

    def list(self, **_: Any) -> list[_Container]:
        return self.running

    def get(self, name: str) -> Any:
        from docker.errors import NotFound

        raise NotFound(name)

    def create(self, **options: Any) -> Any:
        self.created = options
        raise RuntimeError("recorded")


def _gpu_spec(tmp_path: Path, gpus: GpuRequest) -> LaunchSpec:
    return LaunchSpec(
        deployment_id=6, revision_id=12, model_name="cnn", model_version="1",
        model_path=tmp_path / "m.onnx", image="modelport/cnn:1-gpu", device="gpu", gpus=gpus,
    )  # fmt: skip


def test_a_gpu_container_asks_the_engine_for_its_gpus_only(tmp_path: Path) -> None:
    holder = _Container({MANAGED: "gputest", GPUS: "0", "modelport.deployment": "4"})
    engine = _Engine([holder])
    settings = DockerSettings(
        installation="gputest", log_dir=tmp_path / "logs", gpu_devices=("0", "1", "2")
    )
    runtime = DockerRuntime(settings, client=engine)
    with pytest.raises(RuntimeError, match="recorded"):
        runtime.start(_gpu_spec(tmp_path, GpuRequest(count=2)))
    (request,) = engine.created["device_requests"]
    assert request["DeviceIDs"] == ["1", "2"]  # not count=-1 (every GPU), not GPU 0
    assert request["Capabilities"] == [["gpu"]]
    assert engine.created["labels"][GPUS] == "1,2"
    # Three asked for with one taken: refused, and nothing was created.
    engine.created = {}
    with pytest.raises(GpuPlacementError, match="3 GPUs asked for, 2 free of 3"):
        runtime.start(_gpu_spec(tmp_path, GpuRequest(count=3)))
    assert engine.created == {}


def test_placement_is_one_at_a_time_on_a_host(tmp_path: Path) -> None:
    """Two rollouts choosing at once: the second waits until the first has started."""
    lock = tmp_path / "gpu.lock"
    order: list[str] = []

    def first() -> None:
        with placement_lock(lock):
            order.append("first in")
            time.sleep(0.3)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        time.sleep(0.01)
    with placement_lock(lock):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_a_local_instance_sees_only_its_gpus_and_holds_them_until_stopped(
    tmp_path: Path,
) -> None:
    """Real instances (python -m deployer.serving) of the local runtime: each is given its
    GPUs as CUDA_VISIBLE_DEVICES (so its device 0 is its first GPU) and holds them until it
    is stopped. Without CUDA here each instance stays up and reports it is not ready."""
    from deployer.runtimes.local import LocalProcessRuntime
    from tests.onnx_models import linear_model

    model = tmp_path / "m.onnx"
    linear_model(model)
    runtime = LocalProcessRuntime(tmp_path / "state", gpu_devices=("0", "1", "2"))

    def spec(revision: int, gpus: GpuRequest) -> LaunchSpec:
        return LaunchSpec(
            deployment_id=6, revision_id=revision, model_name="demo", model_version="1",
            model_path=model, device="gpu", gpus=gpus,
        )  # fmt: skip

    try:
        first = runtime.start(spec(1, GpuRequest(count=2)))
        assert first.gpus == ("0", "1")
        pid = int(first.handle.split("-")[1])
        assert _environ(pid)["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert runtime.gpus_in_use() == {
            "0": "deployment 6 revision 1",
            "1": "deployment 6 revision 1",
        }
        with pytest.raises(
            GpuPlacementError,
            match=r"2 GPUs asked for, 1 free of 3 \(in use: GPU 0: deployment 6 revision 1",
        ):
            runtime.start(spec(2, GpuRequest(count=2)))
        with pytest.raises(GpuPlacementError, match="GPU 1 is used by deployment 6 revision 1"):
            runtime.start(spec(2, GpuRequest(device_ids=("1",))))
        second = runtime.start(spec(2, GpuRequest(device_ids=("2",))))
        assert second.gpus == ("2",)
        assert _environ(int(second.handle.split("-")[1]))["CUDA_VISIBLE_DEVICES"] == "2"
        runtime.stop(first.handle, grace_s=2)
        assert set(runtime.gpus_in_use()) == {"2"}
        third = runtime.start(spec(3, GpuRequest(count=2)))
        assert third.gpus == ("0", "1")
        _wait_log(runtime, third.handle)  # it runs, and says why it cannot serve
    finally:
        for instance in runtime.owned():
            runtime.stop(instance.handle, grace_s=1)


def _wait_log(runtime: Any, handle: str) -> None:
    deadline = time.monotonic() + 30
    while "GPU requested but onnxruntime has no CUDAExecutionProvider" not in runtime.logs(handle):
        assert time.monotonic() < deadline, runtime.logs(handle)
        time.sleep(0.2)
