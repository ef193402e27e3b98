"""A converter that floods its output, its files or its log is stopped at its caps (issue 12.2).

The payloads are pickles that run code when the job loads them inside the real
converter container; the caps are set small so each flood is reached in seconds.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from deployer.convert.formats import Format
from deployer.convert.runner import ContainerLimits, ContainerSandbox, ConversionRequest
from deployer.errors import DeployerError

MB = 1024 * 1024


class _Runs:
    """Pickles to ``exec(code)``: the code runs when the job unpickles the file."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


def _payload(path: Path, code: str) -> Path:
    path.write_bytes(pickle.dumps(_Runs(textwrap.dedent(code))))
    return path


def _converters(client: Any) -> list[Any]:
    return client.containers.list(all=True, filters={"label": "modelport.flood-test=1"})


def _run(client: Any, image: str, tmp_path: Path, source: Path, limits: ContainerLimits) -> None:
    request = ConversionRequest(
        source=source,
        format=Format.PICKLE,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        serving_opset=21,
    )
    sandbox = ContainerSandbox(client, image, limits, labels={"modelport.flood-test": "1"})
    sandbox.run(request, lambda _event: None)


def test_a_converter_that_floods_its_log_is_stopped(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    source = _payload(
        tmp_path / "m.pkl",
        """
        import sys
        line = "x" * 4095 + "\\n"
        while True:
            sys.stdout.write(line)
        """,
    )
    limits = ContainerLimits(memory_mb=512, timeout_s=120, log_mb=2)
    with pytest.raises(DeployerError, match="more than 2 MB of log") as error:
        _run(docker_engine, converter_image, tmp_path, source, limits)
    assert error.value.code == "log_too_large"
    assert _converters(docker_engine) == []


def test_a_converter_that_floods_one_file_hits_the_file_size_limit(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    source = _payload(
        tmp_path / "m.pkl",
        """
        block = b"\\0" * (1024 * 1024)
        written = 0
        try:
            with open("/work/out/model.onnx", "wb", buffering=0) as out:
                for _ in range(1024):
                    out.write(block)
                    written += 1
        except OSError as exc:
            raise SystemExit(f"stopped after {written} MB: {exc.strerror}") from None
        """,
    )
    limits = ContainerLimits(memory_mb=512, timeout_s=120, disk_mb=16)
    with pytest.raises(DeployerError) as error:
        _run(docker_engine, converter_image, tmp_path, source, limits)
    # The kernel refused the 17th MB at once (EFBIG); the job's own error says so.
    assert error.value.code == "crashed"
    assert "stopped after 16 MB: File too large" in error.value.message
    assert _converters(docker_engine) == []


def test_a_converter_that_floods_its_disk_with_many_files_is_stopped(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    source = _payload(
        tmp_path / "m.pkl",
        """
        import time
        block = b"\\1" * (1024 * 1024)
        for index in range(100000):
            with open(f"/work/out/part{index}", "wb") as out:
                for _ in range(4):
                    out.write(block)
        time.sleep(600)
        """,
    )
    limits = ContainerLimits(memory_mb=512, timeout_s=120, disk_mb=48)
    with pytest.raises(DeployerError, match="more than 48 MB of files") as error:
        _run(docker_engine, converter_image, tmp_path, source, limits)
    assert error.value.code == "disk_full"
    assert _converters(docker_engine) == []


def test_output_past_the_allowance_is_not_taken(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    # Five 7 MB files: each under the 16 MB file limit, 35 MB together; the job then
    # fails at once, before the disk poll, so the copy-out cap is what stops them.
    source = _payload(
        tmp_path / "m.pkl",
        """
        block = b"\\2" * (7 * 1024 * 1024)
        for index in range(5):
            with open(f"/work/out/model.onnx{index}.data", "wb") as out:
                out.write(block)
        raise SystemExit(9)
        """,
    )
    limits = ContainerLimits(memory_mb=512, timeout_s=120, disk_mb=16)
    with pytest.raises(DeployerError) as error:
        _run(docker_engine, converter_image, tmp_path, source, limits)
    assert error.value.code in {"output_too_large", "disk_full"}
    assert list((tmp_path / "out").glob("model.onnx*")) == []
    assert _converters(docker_engine) == []


def _peak_rss_mb(script: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300
    )
    return float(done.stdout.strip().splitlines()[-1])


def test_a_large_upload_is_streamed_into_the_container(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    """Sending a 512 MB upload costs the sending process far less than 512 MB."""
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(512 * MB)
    script = f"""
import resource
from pathlib import Path
from deployer.convert.formats import Format
from deployer.convert.runner import (
    ContainerLimits, ContainerSandbox, ConversionRequest, SANDBOX_UID, _input_entries
)
from deployer.convert.archive import tar_stream
from deployer.images import docker_client
client = docker_client(timeout_s=600)
request = ConversionRequest(source=Path({str(big)!r}), format=Format.PICKLE,
    out_dir=Path({str(tmp_path / "o")!r}), work_dir=Path({str(tmp_path / "w")!r}))
sandbox = ContainerSandbox(client, {converter_image!r}, ContainerLimits(),
    labels={{"modelport.flood-test": "1"}})
container = sandbox._create(["--help"])
try:
    container.put_archive("/work", tar_stream(_input_entries(request), uid=SANDBOX_UID))
    listed = client.api.containers(all=True, size=True, filters={{"id": container.id}})
    assert listed[0]["SizeRw"] >= {512 * MB}, listed
finally:
    container.remove(force=True, v=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    baseline = _peak_rss_mb(
        "import resource, deployer.convert.runner, deployer.images\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    peak = _peak_rss_mb(script)
    print(f"peak RSS {peak:.0f} MB sending 512 MB (imports alone: {baseline:.0f} MB)")
    assert peak - baseline < 128
    assert _converters(docker_engine) == []
