"""Conversion in a throwaway, hardened container: untrusted files never load on the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.convert.formats import Format, resolve
from deployer.convert.onnx_tools import newest_runtime_opset
from deployer.convert.report import ConversionOptions
from deployer.convert.runner import (
    ContainerLimits,
    ContainerSandbox,
    ConversionOutcome,
    ConversionRequest,
    StepEvent,
    convert_model,
)
from deployer.errors import DeployerError
from tests.conftest import require_module
from tests.deployer.convert import conversion_models as cm


def _converters(client: Any) -> list[Any]:
    return client.containers.list(all=True, filters={"label": "modelport.role=converter"})


def convert_in_container(
    client: Any,
    image: str,
    tmp_path: Path,
    source: Path,
    *,
    sample: Path | None = None,
    limits: ContainerLimits | None = None,
    steps: list[StepEvent] | None = None,
) -> ConversionOutcome:
    detection = resolve(source)
    request = ConversionRequest(
        source=source,
        format=detection.format or Format.PICKLE,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        options=ConversionOptions(),
        sample_path=sample,
        detected=detection.evidence,
        serving_opset=newest_runtime_opset(),
    )
    sandbox = ContainerSandbox(
        client, image, limits or ContainerLimits(memory_mb=2048), labels={"modelport.test": "1"}
    )
    return convert_model(request, sandbox, on_step=(steps.append if steps is not None else print))


def test_pickle_that_writes_a_marker_never_touches_the_host(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    cm.marker_pickle(tmp_path / "model.pkl", marker)
    assert resolve(tmp_path / "model.pkl").format == Format.PICKLE  # it looks like sklearn
    with pytest.raises(DeployerError) as error:
        convert_in_container(docker_engine, converter_image, tmp_path, tmp_path / "model.pkl")
    # The payload ran inside the container, where the host's folder does not exist.
    assert "No such file or directory" in error.value.message
    assert not marker.exists()
    assert _converters(docker_engine) == []
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_pytorch_and_sklearn_models_convert_in_the_container(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    require_module("torch")
    cm.pt2_file(tmp_path / "model.pt2")
    cm.torchscript_file(tmp_path / "model.pt")
    np.savez(tmp_path / "sample.npz", **cm.torch_sample())
    cm.pickle_file(tmp_path / "pipe.pkl", cm.string_label_pipeline())
    cm.skops_file(tmp_path / "pipe.skops", cm.string_label_pipeline())
    for name, sample in [
        ("model.pt2", None),
        ("model.pt", tmp_path / "sample.npz"),
        ("pipe.pkl", None),
        ("pipe.skops", None),
    ]:
        steps: list[StepEvent] = []
        outcome = convert_in_container(
            docker_engine,
            converter_image,
            tmp_path / name.replace(".", "-"),
            tmp_path / name,
            sample=sample,
            steps=steps,
        )
        assert outcome.report.passed, (name, outcome.report.check)
        assert outcome.report.sandbox == "container"
        assert outcome.sandbox == "container"
        # Progress came out while the container ran, step by step.
        assert [s.step for s in steps][:3] == ["load", "convert", "check"]
        assert outcome.model_path.is_file()
    assert _converters(docker_engine) == []


def test_the_container_is_hardened(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    sandbox = ContainerSandbox(
        docker_engine,
        converter_image,
        ContainerLimits(memory_mb=1024, cpus=0.5, pids=128, tmpfs_mb=256),
    )
    container = sandbox._create(["--help"])
    try:
        container.reload()
        host = container.attrs["HostConfig"]
        config = container.attrs["Config"]
        assert config["User"] == "10001:10001"
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is False  # the layer is measured instead (SizeRw)
        assert host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["Memory"] == 1024 * 1024 * 1024
        assert host["MemorySwap"] == 1024 * 1024 * 1024
        assert host["NanoCpus"] == 500_000_000
        assert host["PidsLimit"] == 128
        assert "size=256m" in host["Tmpfs"]["/tmp"]
        assert not host.get("Binds")
        assert container.attrs["Mounts"] == []
        assert host["Ulimits"] == [
            {"Name": "fsize", "Soft": 8192 * 1024 * 1024, "Hard": 8192 * 1024 * 1024}
        ]
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-size": "16m", "max-file": "1"},
        }
        assert not host.get("Privileged")
    finally:
        container.remove(force=True, v=True)


def test_memory_and_time_limits_end_the_container(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    cm.greedy_pickle(tmp_path / "greedy.pkl", gigabytes=4)
    with pytest.raises(DeployerError, match="MODELPORT_CONVERSION_MEMORY_MB") as error:
        convert_in_container(
            docker_engine,
            converter_image,
            tmp_path / "a",
            tmp_path / "greedy.pkl",
            limits=ContainerLimits(memory_mb=768),
        )
    assert error.value.code == "out_of_memory"
    cm.slow_pickle(tmp_path / "slow.pkl", seconds=600)
    with pytest.raises(DeployerError, match="MODELPORT_CONVERSION_TIMEOUT_S") as error:
        convert_in_container(
            docker_engine,
            converter_image,
            tmp_path / "b",
            tmp_path / "slow.pkl",
            limits=ContainerLimits(memory_mb=1024, timeout_s=10),
        )
    assert error.value.code == "timeout"
    assert _converters(docker_engine) == []
