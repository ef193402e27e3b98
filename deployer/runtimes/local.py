"""Run serving instances as local child processes (the default when no Docker engine is used).

Each instance is ``python -m deployer.serving`` in its own session on free ports.
A small JSON file per instance records its process id and start time (so a reused
process id is never mistaken for ours) and the ids it serves. Instances outlive
the worker that started them; the reconcile task adopts or cleans them up.

With ``stable_address`` (no proxy in front), every deployment also has two public
ports that never change: listening sockets that one instance hands to the next
(:mod:`deployer.serving.listen_socket`). The first instance's sockets are bound here;
later ones get them from a live instance of the deployment over its control socket,
so deploys, rollbacks and restarts of the portal never move the address. The ports
are recorded per deployment, so an address whose instances all died is bound again.
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
    InstanceExit,
    InstanceState,
    InstanceStatus,
    LaunchResult,
    LaunchSpec,
    OwnedInstance,
)
from deployer.runtimes.gpus import discover_inventory, place, placement_lock
from deployer.serving.listen_socket import activate, bind_public, fetch_fds


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

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        stable_address: bool = False,
        gpu_devices: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.stable_address = stable_address
        # The host's GPUs (device ids); empty: the ones nvidia-smi lists here, if any.
        self.gpu_devices = gpu_devices
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ interface
    def start(self, spec: LaunchSpec) -> LaunchResult:
        if not spec.model_path.is_file():
            raise LaunchError(f"The model file for {spec.model_name} is missing from storage.")
        if spec.device != "gpu":
            return self._start(spec, ())
        # Chosen and started under one lock: two rollouts never pick the same GPU. The
        # instance sees only its own (CUDA_VISIBLE_DEVICES), as its device 0 and on.
        with placement_lock(self.state_dir / "gpu.lock"):
            devices = place(self.gpu_devices or discover_inventory(), self.gpus_in_use(), spec.gpus)
            return self._start(spec, devices)

    def gpus_in_use(self) -> dict[str, str]:
        """Device id -> the instance of ours holding it (until it is stopped)."""
        held: dict[str, str] = {}
        for state in self._states():
            for device in state.get("gpus") or ():
                held[str(device)] = (
                    f"deployment {state.get('deployment_id', '?')} "
                    f"revision {state.get('revision_id', '?')}"
                )
        return held

    def _start(self, spec: LaunchSpec, gpus: tuple[str, ...]) -> LaunchResult:
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
        if spec.keys_file is not None:
            command += ["--keys-file", str(spec.keys_file)]
        if spec.warmup_sample is not None:
            command += ["--warmup-sample", str(spec.warmup_sample)]
        if spec.async_dir is not None:
            command += [
                "--async-dir", str(spec.async_dir),
                "--async-max-queue", str(spec.async_max_queue),
                "--async-callback-hosts", spec.async_callback_hosts,
            ]  # fmt: skip
        stamp = time.time_ns()
        log_path = self.state_dir / f"revision-{spec.revision_id}-{stamp}.log"
        public: list[socket.socket] = []
        control = self.state_dir / f"c{spec.revision_id}-{stamp % 10**9}.sock"
        public_ports = (0, 0)
        if self.stable_address:
            if len(str(control)) > 100:
                raise LaunchError(f"{self.state_dir} is too long a path for a control socket.")
            public_ports, public = self._public_sockets(spec.deployment_id)
            fds = [sock.fileno() for sock in public] + [-1]
            command += ["--listen-fds", f"{fds[0]},{fds[1]}", "--handover", str(control)]
        pid_file = self.state_dir / f"k{spec.revision_id}-{stamp}.pid"
        exit_file = self.state_dir / f"k{spec.revision_id}-{stamp}.exit"
        keeper = [sys.executable, "-m", "deployer.runtimes.keeper", str(pid_file), str(exit_file)]
        try:
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [*keeper, "--", *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=self._env(gpus),
                    pass_fds=[sock.fileno() for sock in public],
                )
        finally:
            for sock in public:  # the instance holds its own copies now
                sock.close()
        pid = self._instance_pid(proc, pid_file)
        started = _start_time(pid) or "0"
        handle = f"proc-{pid}-{started}"
        state = {
            "pid": pid,
            "start_time": started,
            "keeper_pid": proc.pid,
            "exit_file": exit_file.name,
            "deployment_id": spec.deployment_id,
            "revision_id": spec.revision_id,
            "replica_id": spec.replica_id,
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "log": log_path.name,
            "labels": spec.labels,
            "control": control.name if self.stable_address else "",
            "gpus": list(gpus),
        }
        self._state_path(handle).write_text(json.dumps(state))
        # A second name for the log, found from the handle alone: a failed instance's page
        # still shows its lines after stop() has removed its state.
        with contextlib.suppress(OSError):
            os.link(log_path, self._ended_log(handle))
        pid_file.unlink(missing_ok=True)
        return LaunchResult(
            handle=handle,
            url=f"http://{self.host}:{http_port}",
            grpc_address=f"{self.host}:{grpc_port}",
            metrics_url=f"http://{self.host}:{metrics_port}/metrics",
            public_url=f"http://{self.host}:{public_ports[0]}" if public_ports[0] else "",
            public_grpc=f"{self.host}:{public_ports[1]}" if public_ports[1] else "",
            gpus=gpus,
        )

    @staticmethod
    def _instance_pid(keeper: subprocess.Popen[bytes], pid_file: Path) -> int:
        """The instance's process id, as its keeper wrote it (within a few seconds)."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                return int(json.loads(pid_file.read_text())["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if keeper.poll() is not None:
                break
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(keeper.pid, signal.SIGKILL)
        keeper.wait()
        pid_file.unlink(missing_ok=True)
        raise LaunchError("The local instance did not start (its keeper process ended).")

    def take_over(self, handle: str) -> None:
        """Make the instance accept on its deployment's stable address."""
        state = self._state(handle)
        if state is None or not state.get("control"):
            raise LaunchError(f"{handle} holds no stable address.")
        try:
            activate(self.state_dir / str(state["control"]))
        except OSError as exc:
            raise LaunchError(f"The instance did not take the stable address: {exc}") from exc

    def _public_sockets(self, deployment_id: int) -> tuple[tuple[int, int], list[socket.socket]]:
        """The deployment's public ports, and its listening sockets: from a live instance
        of the deployment, or bound here when none holds them."""
        record = self.state_dir / f"deployment-{int(deployment_id)}.json"
        try:
            loaded = json.loads(record.read_text())
            ports = (int(loaded["http_port"]), int(loaded["grpc_port"]))
        except (OSError, ValueError, KeyError, TypeError):
            ports = (free_port(self.host), free_port(self.host))
            record.write_text(json.dumps({"http_port": ports[0], "grpc_port": ports[1]}))
        # A holder started a moment ago (another replica of the same rollout) holds the
        # sockets before its control socket is up: wait for it rather than bind twice.
        deadline = time.monotonic() + 60
        while True:
            holders = sorted(
                (s for s in self._states() if int(s["deployment_id"]) == int(deployment_id)),
                key=lambda s: str(s.get("control", "")),
                reverse=True,
            )
            starting = False
            for state in holders:
                if not state.get("control") or not self._alive(state):
                    continue
                control = self.state_dir / str(state["control"])
                if not control.exists():
                    starting = True
                    continue
                try:
                    return ports, fetch_fds(control)
                except OSError:
                    continue  # a holder that is stopping; the next one, or a fresh bind
            if not starting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        bound: list[socket.socket] = []
        try:
            for port in ports:
                bound.append(bind_public(self.host, port))
        except OSError as exc:
            for sock in bound:
                sock.close()
            raise LaunchError(
                f"The stable address {self.host}:{port} of this deployment cannot be "
                f"bound ({exc.strerror}); another process holds that port."
            ) from exc
        return ports, bound

    def _states(self) -> list[dict[str, Any]]:
        found = []
        for path in self.state_dir.glob("proc-*.json"):
            state = self._state(path.stem)
            if state is not None:
                found.append(state)
        return found

    def stop(self, handle: str, *, grace_s: float = 10.0) -> None:
        state = self._state(handle)
        if state is None:
            return
        pid = int(state["pid"])
        # The keeper leads the process group (instances started before keepers: the
        # instance does); one signal to the group reaches the instance.
        group = int(state.get("keeper_pid") or pid)
        if self._alive(state):
            self._signal(group, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._alive(state):
                time.sleep(0.05)
            if self._alive(state):
                self._signal(group, signal.SIGKILL)
        self._reap(pid)
        keeper = int(state.get("keeper_pid") or 0)
        if keeper:
            # The keeper reaps the instance and exits: until it has, the instance lingers
            # as a zombie that still holds its process id.
            deadline = time.monotonic() + max(grace_s, 2.0)
            while True:
                self._reap(keeper)
                if _start_time(keeper) is None or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        if state.get("control"):  # left behind by an instance that was killed
            (self.state_dir / str(state["control"])).unlink(missing_ok=True)
        if state.get("exit_file"):
            (self.state_dir / str(state["exit_file"])).unlink(missing_ok=True)
        self._state_path(handle).unlink(missing_ok=True)

    def status(self, handle: str) -> InstanceStatus:
        state = self._state(handle)
        if state is None:
            return InstanceStatus(InstanceState.MISSING, "no such instance")
        if self._alive(state):
            return InstanceStatus(InstanceState.RUNNING)
        ended = self.exit_of(handle)
        detail = f"process {state['pid']} {ended.cause}" if ended else ""
        return InstanceStatus(InstanceState.EXITED, detail or self._exit_detail(int(state["pid"])))

    def exit_of(self, handle: str) -> InstanceExit | None:
        """How the instance ended, as its keeper recorded it (None while it runs, or when
        it was started without a keeper or its keeper was killed too)."""
        state = self._state(handle)
        if state is None or not state.get("exit_file"):
            return None
        self._reap(int(state.get("keeper_pid") or 0))
        try:
            code = int(
                json.loads((self.state_dir / str(state["exit_file"])).read_text())["returncode"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        name = ""
        if code < 0:
            with contextlib.suppress(ValueError):
                name = signal.Signals(-code).name
            name = name or f"{-code}"
        return InstanceExit(
            runtime=self.name,
            handle=handle,
            deployment_id=int(state["deployment_id"]),
            revision_id=int(state["revision_id"]),
            replica_id=int(state.get("replica_id") or 0),
            exit_code=code if code >= 0 else None,
            signal=name,
        )

    def watch_target(self, handle: str) -> tuple[int, str] | None:
        """The instance's process id and kernel start time, for a pidfd watcher."""
        state = self._state(handle)
        if state is None:
            return None
        return int(state["pid"]), str(state["start_time"])

    def log_file(self, handle: str) -> Path | None:
        """The file the instance writes its output to (None for an unknown handle)."""
        state = self._state(handle)
        if state is not None:
            return self.state_dir / str(state["log"])
        ended = (
            self._ended_log(handle) if handle.startswith("proc-") and "/" not in handle else None
        )
        return ended if ended is not None and ended.is_file() else None

    def _ended_log(self, handle: str) -> Path:
        return self.state_dir / f"{handle}.log"

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
                    replica_id=int(state.get("replica_id") or 0),
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
        if pid <= 0:
            return
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
    def _env(gpus: tuple[str, ...] = ()) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
        env = {key: os.environ[key] for key in keep if key in os.environ}
        env["PYTHONUNBUFFERED"] = "1"
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env
