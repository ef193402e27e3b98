"""Run serving instances as local child processes (the default when no Docker engine is used).

Each instance is ``python -m deployer.serving`` in its own session on free ports.
A small JSON file per instance records its process id and start time (so a reused
process id is never mistaken for ours) and the ids it serves. Instances outlive
the worker that started them; the reconcile task adopts or cleans them up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deployer.errors import LaunchError
from deployer.logs import tail_lines
from deployer.runtimes.base import (
    InstanceState,
    InstanceStatus,
    LaunchResult,
    LaunchSpec,
    OwnedInstance,
)


def free_port(host: str) -> int:
    """A port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``, or None when there is no live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


class LocalProcessRuntime:
    """Serving instances as processes on this machine."""

    name = "local"

    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1") -> None:
        self.state_dir = state_dir
        self.host = host
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ interface
    def start(self, spec: LaunchSpec) -> LaunchResult:
        if not spec.model_path.is_file():
            raise LaunchError(f"The model file for {spec.model_name} is missing from storage.")
        http_port = free_port(self.host)
        grpc_port = free_port(self.host)
        metrics_port = free_port(self.host)
        command = [
            sys.executable, "-m", "deployer.serving",
            "--model", str(spec.model_path),
            "--model-name", spec.model_name,
            "--model-version", spec.model_version,
            "--host", self.host,
            "--http-port", str(http_port),
            "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port),
            "--device", spec.device,
        ]  # fmt: skip
        log_path = self.state_dir / f"revision-{spec.revision_id}-{time.time_ns()}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self._env(),
            )
        started = _start_time(proc.pid) or "0"
        handle = f"proc-{proc.pid}-{started}"
        state = {
            "pid": proc.pid,
            "start_time": started,
            "deployment_id": spec.deployment_id,
            "revision_id": spec.revision_id,
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "log": log_path.name,
            "labels": spec.labels,
        }
        self._state_path(handle).write_text(json.dumps(state))
        return LaunchResult(
            handle=handle,
            url=f"http://{self.host}:{http_port}",
            grpc_address=f"{self.host}:{grpc_port}",
            metrics_url=f"http://{self.host}:{metrics_port}/metrics",
        )

    def stop(self, handle: str, *, grace_s: float = 10.0) -> None:
        state = self._state(handle)
        if state is None:
            return
        pid = int(state["pid"])
        if self._alive(state):
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._alive(state):
                time.sleep(0.05)
            if self._alive(state):
                self._signal(pid, signal.SIGKILL)
        self._reap(pid)
        self._state_path(handle).unlink(missing_ok=True)

    def status(self, handle: str) -> InstanceStatus:
        state = self._state(handle)
        if state is None:
            return InstanceStatus(InstanceState.MISSING, "no such instance")
        if self._alive(state):
            return InstanceStatus(InstanceState.RUNNING)
        return InstanceStatus(InstanceState.EXITED, self._exit_detail(int(state["pid"])))

    def log_file(self, handle: str) -> Path | None:
        """The file the instance writes its output to (None for an unknown handle)."""
        state = self._state(handle)
        return None if state is None else self.state_dir / str(state["log"])

    def logs(self, handle: str, *, tail: int = 200) -> str:
        path = self.log_file(handle)
        return "" if path is None else tail_lines(path, tail)

    def owned(self) -> list[OwnedInstance]:
        instances = []
        for path in sorted(self.state_dir.glob("proc-*.json")):
            handle = path.stem
            state = self._state(handle)
            if state is None:
                continue
            alive = self._alive(state)
            instances.append(
                OwnedInstance(
                    handle=handle,
                    deployment_id=int(state["deployment_id"]),
                    revision_id=int(state["revision_id"]),
                    state=InstanceState.RUNNING if alive else InstanceState.EXITED,
                )
            )
        return instances

    # ------------------------------------------------------------ helpers
    def _state_path(self, handle: str) -> Path:
        if not handle.startswith("proc-") or "/" in handle:
            raise LaunchError(f"{handle!r} is not a local runtime handle")
        return self.state_dir / f"{handle}.json"

    def _state(self, handle: str) -> dict[str, Any] | None:
        try:
            loaded = json.loads(self._state_path(handle).read_text())
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    @staticmethod
    def _alive(state: dict[str, Any]) -> bool:
        pid = int(state["pid"])
        LocalProcessRuntime._reap(pid)
        return _start_time(pid) == str(state["start_time"])

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    @staticmethod
    def _exit_detail(pid: int) -> str:
        return f"process {pid} has exited"

    @staticmethod
    def _env() -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
        env = {key: os.environ[key] for key in keep if key in os.environ}
        env["PYTHONUNBUFFERED"] = "1"
        return env
