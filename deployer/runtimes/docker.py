"""Run serving instances as hardened Docker containers, through the Docker SDK.

Every container runs a model image (``deployer.images``) with the same profile:
an unprivileged user, a read-only root file system with a small ``/tmp`` tmpfs,
every capability dropped, ``no-new-privileges``, memory, CPU and process limits
from the deployment, no host mounts (and never the Docker socket), and labels with
the installation, deployment and revision. ``owned()`` lists only containers that
carry this installation's label, so nothing else on the engine is ever touched.

Logs: a small shipper process (started on demand, one per installation) follows
every running container of ours and writes its output to a file per container,
so that processes without access to the engine (the web server) read logs from
files. ``python -m deployer.runtimes.docker ship ...`` is that process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError, LaunchError
from deployer.images.build import EngineUnavailable, docker_client
from deployer.images.names import LABEL_PREFIX, check_labels, check_reference
from deployer.images.runtime import RUNTIME_UID, SERVING_PORTS
from deployer.logs import tail_lines
from deployer.runtimes.base import (
    InstanceState,
    InstanceStatus,
    LaunchResult,
    LaunchSpec,
    OwnedInstance,
)

MANAGED = f"{LABEL_PREFIX}installation"
DEPLOYMENT = f"{LABEL_PREFIX}deployment"
REVISION = f"{LABEL_PREFIX}revision"
_INSTALLATION = re.compile(r"^[a-z0-9]{4,32}$")
_CONTAINER_ID = re.compile(r"^[a-f0-9]{12,64}$")
LOG_MAX_BYTES = 2 * 1024 * 1024
# Per process: what the last GPU check of each installation found, and when.
_GPU_CHECKS: dict[str, tuple[float, str]] = {}
LOG_TAIL_ON_START = 2000

NO_GPU_RUNTIME = (
    "This Docker engine has no NVIDIA GPU runtime, so it cannot start GPU containers. "
    "Install the NVIDIA driver and the NVIDIA Container Toolkit on the Docker host "
    "(then `nvidia-ctk runtime configure --runtime=docker` and restart dockerd), or "
    "deploy with device cpu."
)


@dataclass(frozen=True)
class DockerSettings:
    """How this installation runs containers."""

    # Marks our containers; two installations sharing one engine never touch each other's.
    installation: str
    # Where the log shipper writes one file per container (readable without the engine).
    log_dir: Path
    # A Docker network to attach containers to, reaching them by their address on it
    # (docker-compose); empty: publish their ports on ``publish_host`` instead.
    network: str = ""
    publish_host: str = "127.0.0.1"
    tmpfs_mb: int = 64
    log_max_size: str = "10m"


class DockerRuntime:
    """Serving instances as containers on a Docker engine."""

    name = "docker"

    def __init__(self, settings: DockerSettings, *, client: Any = None) -> None:
        if not _INSTALLATION.match(settings.installation):
            raise LaunchError(f"{settings.installation!r} is not a valid installation id.")
        self.settings = settings
        self._client = client

    @property
    def client(self) -> Any:
        """The SDK client, connected on first use (processes that only read logs never do)."""
        if self._client is None:
            self._client = docker_client(timeout_s=120)
        return self._client

    # ------------------------------------------------------------ interface
    def start(self, spec: LaunchSpec) -> LaunchResult:
        from docker.errors import APIError, ImageNotFound
        from docker.types import DeviceRequest

        if not spec.image:
            raise LaunchError(f"Version {spec.model_version} has no image to run.")
        check_reference(spec.image)
        if spec.device == "gpu" and (reason := self.gpu_unavailable_reason()):
            raise LaunchError(reason, code="gpu_unavailable")
        labels = check_labels(
            {
                **spec.labels,
                MANAGED: self.settings.installation,
                DEPLOYMENT: str(spec.deployment_id),
                REVISION: str(spec.revision_id),
                f"{LABEL_PREFIX}model": spec.model_name,
                f"{LABEL_PREFIX}model-version": spec.model_version,
            }
        )
        name = self.container_name(spec.revision_id)
        self._remove_leftover(name)
        options: dict[str, Any] = {
            "image": spec.image,
            "name": name,
            "labels": labels,
            "environment": {
                "MODELPORT_SERVING_MODEL_NAME": spec.model_name,
                "MODELPORT_SERVING_MODEL_VERSION": spec.model_version,
            },
            "user": f"{RUNTIME_UID}:{RUNTIME_UID}",
            "read_only": True,
            # The only writable path: a small in-memory /tmp inside the container.
            "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={self.settings.tmpfs_mb}m"},  # noqa: S108
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "mem_limit": f"{spec.memory_mb}m",
            "memswap_limit": f"{spec.memory_mb}m",
            "nano_cpus": max(int(spec.cpus * 1e9), 10_000_000),
            "pids_limit": spec.pids_limit,
            "ipc_mode": "private",
            "restart_policy": {"Name": "no"},
            "log_config": {
                "type": "json-file",
                "config": {"max-size": self.settings.log_max_size, "max-file": "2"},
            },
            "stop_signal": "SIGTERM",
        }
        if self.settings.network:
            options["network"] = self.settings.network
        else:
            options["ports"] = {
                f"{port}/tcp": (self.settings.publish_host, None) for port in SERVING_PORTS.values()
            }
        if spec.device == "gpu":
            options["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        try:
            # create + start, not run: run would try to pull a missing image from a registry.
            container = self.client.containers.create(**options)
        except ImageNotFound as exc:
            raise LaunchError(
                f"The image {spec.image} is not on the Docker engine; build the version again."
            ) from exc
        except APIError as exc:
            raise LaunchError(self._explain(exc)) from exc
        try:
            container.start()
        except APIError as exc:
            with contextlib.suppress(APIError):
                container.remove(force=True)
            raise LaunchError(self._explain(exc)) from exc
        try:
            container.reload()
            http, grpc, metrics = self._addresses(container.attrs)
        except (APIError, LaunchError):
            with contextlib.suppress(APIError):
                container.remove(force=True)
            raise
        self.ensure_log_shipper()
        return LaunchResult(
            handle=str(container.id),
            url=f"http://{http}",
            grpc_address=grpc,
            metrics_url=f"http://{metrics}/metrics",
        )

    def stop(self, handle: str, *, grace_s: float = 10.0) -> None:
        from docker.errors import APIError, NotFound

        container = self._ours(handle)
        if container is None:
            return
        try:
            if container.status == "running":
                container.stop(timeout=max(1, math.ceil(grace_s)))
            container.remove(force=True)
        except NotFound:
            return
        except APIError as exc:
            raise LaunchError(f"Container {handle[:12]} could not be removed: {exc}") from exc

    def status(self, handle: str) -> InstanceStatus:
        container = self._ours(handle)
        if container is None:
            return InstanceStatus(InstanceState.MISSING, "no such container")
        state = container.attrs.get("State") or {}
        if state.get("Running"):
            return InstanceStatus(InstanceState.RUNNING)
        return InstanceStatus(InstanceState.EXITED, exit_detail(state))

    def logs(self, handle: str, *, tail: int = 200) -> str:
        from docker.errors import APIError

        container = self._ours(handle)
        if container is None:
            return read_log_file(self.settings.log_dir, handle, tail=tail)
        try:
            raw = container.logs(tail=tail, stdout=True, stderr=True)
        except APIError:
            return read_log_file(self.settings.log_dir, handle, tail=tail)
        return bytes(raw).decode("utf-8", "replace")

    def owned(self) -> list[OwnedInstance]:
        instances = []
        for container in self._list(all_states=True):
            labels = container.labels or {}
            try:
                deployment_id, revision_id = int(labels[DEPLOYMENT]), int(labels[REVISION])
            except (KeyError, ValueError):
                continue
            running = (container.attrs.get("State") or {}).get("Running", False)
            instances.append(
                OwnedInstance(
                    handle=str(container.id),
                    deployment_id=deployment_id,
                    revision_id=revision_id,
                    state=InstanceState.RUNNING if running else InstanceState.EXITED,
                )
            )
        return instances

    # ------------------------------------------------------------ GPU
    def gpu_unavailable_reason(self, *, probe_image: str = "", max_age_s: float = 300) -> str:
        """Why this engine cannot run GPU containers, or "" when it can.

        An engine with the ``nvidia`` runtime registered can. Without it, the
        NVIDIA hook may still be installed, so a throw-away container with a GPU
        request settles it when an image is at hand; Docker's own error for that
        case (``could not select device driver "" with capabilities: [[gpu]]``)
        becomes a sentence that says what to install.
        """
        cached = _GPU_CHECKS.get(self.settings.installation)
        if cached and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        reason = self._gpu_reason(probe_image)
        _GPU_CHECKS[self.settings.installation] = (time.monotonic(), reason)
        return reason

    def _gpu_reason(self, probe_image: str) -> str:
        from docker.errors import APIError, ImageNotFound
        from docker.types import DeviceRequest

        try:
            info = self.client.info()
        except (APIError, EngineUnavailable) as exc:
            return f"The Docker engine could not be asked about GPUs: {exc}"
        if "nvidia" in (info.get("Runtimes") or {}):
            return ""
        image = probe_image or self._any_local_image()
        if not image:
            return NO_GPU_RUNTIME
        try:
            # create + start, not run: run would try a registry for a missing image and
            # leave the container behind when the start fails.
            probe = self.client.containers.create(
                image,
                entrypoint=["true"],
                command=[],
                device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
                labels={MANAGED: self.settings.installation, f"{LABEL_PREFIX}probe": "gpu"},
                network_mode="none",
                cap_drop=["ALL"],
                read_only=True,
            )
        except (APIError, ImageNotFound) as exc:
            return f"{NO_GPU_RUNTIME} (Docker said: {str(exc).splitlines()[0][:300]})"
        try:
            probe.start()
            probe.wait(timeout=60)
        except APIError as exc:
            text = str(exc)
            if "could not select device driver" in text or "nvidia" in text.lower():
                return NO_GPU_RUNTIME
            return f"{NO_GPU_RUNTIME} (Docker said: {text.splitlines()[0][:300]})"
        finally:
            with contextlib.suppress(APIError):
                probe.remove(force=True)
        return ""

    def _any_local_image(self) -> str:
        for image in self.client.images.list(filters={"label": f"{LABEL_PREFIX}kind"}):
            if image.tags:
                return str(image.tags[0])
        return ""

    # ------------------------------------------------------------ logs
    def ensure_log_shipper(self) -> None:
        """Start the log shipper for this installation unless it is running."""
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.settings.log_dir / "shipper.pid"
        if _process_alive(pid_file):
            return
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "DOCKER_HOST", "HOME", "LANG")}
        with (self.settings.log_dir / "shipper.log").open("ab") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "deployer.runtimes.docker",
                    "ship",
                    "--installation",
                    self.settings.installation,
                    "--log-dir",
                    str(self.settings.log_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        _write_pid(pid_file, process.pid)

    def prune_log_files(self, *, max_age_s: float = 7 * 24 * 3600) -> int:
        """Delete saved logs of containers that are gone, once they are ``max_age_s`` old."""
        log_dir = self.settings.log_dir
        if not log_dir.is_dir():
            return 0
        kept = {instance.handle for instance in self.owned()}
        removed = 0
        now = time.time()
        for path in log_dir.glob("*.log"):
            if path.stem in kept or path.name == "shipper.log":
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    removed += 1
        return removed

    # ------------------------------------------------------------ helpers
    def container_name(self, revision_id: int) -> str:
        """One name per revision: the engine refuses a second container for it."""
        return f"mp-{self.settings.installation}-r{revision_id}"

    def _list(self, *, all_states: bool) -> list[Any]:
        return list(
            self.client.containers.list(
                all=all_states, filters={"label": f"{MANAGED}={self.settings.installation}"}
            )
        )

    def _ours(self, handle: str) -> Any | None:
        from docker.errors import NotFound

        if not _CONTAINER_ID.match(handle):
            raise LaunchError(f"{handle!r} is not a container id.")
        try:
            container = self.client.containers.get(handle)
        except NotFound:
            return None
        if (container.labels or {}).get(MANAGED) != self.settings.installation:
            # Not ours: never stop, inspect or read another installation's container.
            return None
        return container

    def _remove_leftover(self, name: str) -> None:
        """Remove our container of this name left by an interrupted attempt."""
        from docker.errors import NotFound

        try:
            container = self.client.containers.get(name)
        except NotFound:
            return
        if (container.labels or {}).get(MANAGED) != self.settings.installation:
            raise LaunchError(f"A container named {name} exists and is not ModelPort's.")
        container.remove(force=True)

    def _addresses(self, attrs: dict[str, Any]) -> tuple[str, str, str]:
        settings = attrs.get("NetworkSettings") or {}
        found = []
        if self.settings.network:
            network = (settings.get("Networks") or {}).get(self.settings.network) or {}
            address = network.get("IPAddress")
            if not address:
                raise LaunchError(f"The container got no address on {self.settings.network}.")
            found = [f"{address}:{port}" for port in SERVING_PORTS.values()]
        else:
            ports = settings.get("Ports") or {}
            for port in SERVING_PORTS.values():
                bindings = ports.get(f"{port}/tcp") or []
                if not bindings:
                    raise LaunchError(f"Docker published no host port for container port {port}.")
                found.append(f"{self.settings.publish_host}:{bindings[0]['HostPort']}")
        return found[0], found[1], found[2]

    @staticmethod
    def _explain(exc: Exception) -> str:
        text = str(exc)
        if "could not select device driver" in text:
            return NO_GPU_RUNTIME
        return f"Docker could not start the container: {text.splitlines()[0][:400]}"


def exit_detail(state: dict[str, Any]) -> str:
    """Why a container is not running, in words."""
    if state.get("OOMKilled"):
        return "it ran out of memory (killed at the deployment's memory limit)"
    status = state.get("Status", "exited")
    code = state.get("ExitCode")
    error = state.get("Error") or ""
    detail = f"container {status}"
    if code is not None and status != "created":
        detail += f" with exit code {code}"
    if error:
        detail += f": {error}"
    return detail


# ---------------------------------------------------------------- log files


def log_path(log_dir: Path, handle: str) -> Path:
    """The file the shipper writes a container's output to."""
    if not _CONTAINER_ID.match(handle):
        raise DeployerError(f"{handle!r} is not a container id.")
    return log_dir / f"{handle}.log"


def read_log_file(log_dir: Path, handle: str, *, tail: int = 200) -> str:
    """The last ``tail`` lines the shipper saved for a container ("" when none)."""
    return tail_lines(log_path(log_dir, handle), tail)


def _process_alive(pid_file: Path) -> bool:
    try:
        recorded = json.loads(pid_file.read_text())
        stat = Path(f"/proc/{int(recorded['pid'])}/stat").read_text()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and fields[19] == str(recorded.get("start_time"))


def _write_pid(pid_file: Path, pid: int) -> None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat[stat.rindex(")") + 2 :].split()[19]
    except OSError:
        start = "0"
    scratch = pid_file.with_suffix(".tmp")
    scratch.write_text(json.dumps({"pid": pid, "start_time": start}))
    os.replace(scratch, pid_file)


def _follow(container: Any, path: Path, stop: threading.Event) -> None:
    """Write a container's log (its last lines, then everything new) to ``path``."""
    from docker.errors import APIError

    with contextlib.suppress(OSError, APIError), path.open("wb") as out:
        size = 0
        for chunk in container.logs(stream=True, follow=True, tail=LOG_TAIL_ON_START):
            if stop.is_set():
                return
            out.write(chunk)
            out.flush()
            size += len(chunk)
            if size > LOG_MAX_BYTES:
                size = _shrink(out, path)


def _shrink(out: Any, path: Path) -> int:
    """Keep the newer half of an over-long log file."""
    out.flush()
    keep = path.read_bytes()[-LOG_MAX_BYTES // 2 :]
    keep = keep[keep.find(b"\n") + 1 :]
    out.seek(0)
    out.truncate()
    out.write(keep)
    out.flush()
    return len(keep)


def ship(installation: str, log_dir: Path, *, poll_s: float = 1.0, idle_exit_s: float = 60) -> int:
    """Follow every running container of this installation into files, until idle."""
    client = docker_client(timeout_s=24 * 3600)
    followers: dict[str, threading.Thread] = {}
    stop = threading.Event()
    idle_since = time.monotonic()
    while log_dir.is_dir():
        running = client.containers.list(
            filters={"label": f"{MANAGED}={installation}", "status": "running"}
        )
        for container in running:
            thread = followers.get(container.id)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(
                    target=_follow,
                    args=(container, log_path(log_dir, str(container.id)), stop),
                    daemon=True,
                )
                thread.start()
                followers[container.id] = thread
        if running or any(t.is_alive() for t in followers.values()):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_exit_s:
            break
        time.sleep(poll_s)
    stop.set()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deployer.runtimes.docker ship --installation ID --log-dir DIR``."""
    parser = argparse.ArgumentParser(prog="python -m deployer.runtimes.docker")
    commands = parser.add_subparsers(dest="command", required=True)
    shipper = commands.add_parser("ship", help="follow our containers' logs into files")
    shipper.add_argument("--installation", required=True)
    shipper.add_argument("--log-dir", required=True, type=Path)
    shipper.add_argument("--idle-exit-s", type=float, default=60)
    args = parser.parse_args(argv)
    if not _INSTALLATION.match(args.installation):
        parser.error("bad installation id")
    return ship(args.installation, args.log_dir, idle_exit_s=args.idle_exit_s)


if __name__ == "__main__":
    sys.exit(main())
