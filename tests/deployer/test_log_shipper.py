"""The log shipper (a real process on the real engine) ends promptly on its stop signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deployer.images.build import engine_available
from deployer.runtimes.docker import DockerRuntime, DockerSettings
from tests.conftest import require


@pytest.fixture(scope="module", autouse=True)
def _engine() -> None:
    require("Docker engine", engine_available(), "make test starts dockerd as root")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shipper_exits_cleanly_within_two_seconds_of_its_stop_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "deployer.runtimes.docker", "ship",
         "--installation", f"t{uuid.uuid4().hex[:12]}", "--log-dir", str(tmp_path),
         "--idle-exit-s", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    time.sleep(1.5)  # into its polling loop
    assert process.poll() is None, process.communicate()[0]
    started = time.monotonic()
    process.send_signal(signum)
    output, _ = process.communicate(timeout=10)
    took = time.monotonic() - started
    assert took < 2, f"the shipper took {took:.1f} s to stop"
    assert process.returncode == 0, output
    assert b"Traceback" not in output


def test_runtime_stops_the_shipper_it_started(tmp_path: Path) -> None:
    runtime = DockerRuntime(
        DockerSettings(installation=f"t{uuid.uuid4().hex[:12]}", log_dir=tmp_path / "logs")
    )
    assert runtime.stop_log_shipper() is False
    runtime.ensure_log_shipper()
    time.sleep(1.0)
    started = time.monotonic()
    assert runtime.stop_log_shipper() is True
    assert time.monotonic() - started < 2
    assert not (tmp_path / "logs" / "shipper.pid").exists()
