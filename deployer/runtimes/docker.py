"""Run serving instances as hardened Docker containers, through the Docker SDK.

Every container runs a model image (``deployer.images``) with the same profile:
an unprivileged user, a read-only root file system with a small ``/tmp`` tmpfs,
every capability dropped, ``no-new-privileges``, memory, CPU and process limits
from the deployment, no host mounts but its deployment's keys folder (read-only) and its
async spool (read-write; never the Docker socket), and labels with
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
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError, LaunchError
from deployer.images.build import EngineUnavailable, docker_client
from deployer.images.names import LABEL_PREFIX, check_labels, check_reference
from deployer.images.runtime import RUNTIME_UID, SERVING_PORTS
from deployer.keys import CONTAINER_KEYS_DIR
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

MANAGED = f"{LABEL_PREFIX}installation"
DEPLOYMENT = f"{LABEL_PREFIX}deployment"
REVISION = f"{LABEL_PREFIX}revision"
GPUS = f"{LABEL_PREFIX}gpus"
# Tries of a container list that raced a removal (see DockerRuntime._list).
LIST_ATTEMPTS = 5
REPLICA = f"{LABEL_PREFIX}replica"
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
    # When this process runs in a container itself (docker-compose), a folder it hands to
    # the engine as a bind mount must be named as the engine's host sees it:
    # (this process's path of the data folder, the host's path of the same folder).
    host_data: tuple[Path, Path] | None = None
    # A named Docker volume that holds the keys folder (<data>/keys: one folder per
    # deployment), mounted read-only instead of a host folder (docker-compose).
    keys_volume: str = ""
    # The host's GPUs (device ids); empty: the ones nvidia-smi lists here, if any.
    gpu_devices: tuple[str, ...] = ()

    def host_path(self, path: Path) -> Path:
        """``path`` as the engine's host names it (a bind mount's source)."""
        if self.host_data is None:
            return path
        ours, host = self.host_data
        try:
            return host / path.relative_to(ours)
        except ValueError:
            raise LaunchError(
                f"{path} is outside the data folder {ours}, the only folder this worker "
                "shares with the Docker host; it cannot be mounted into a container."
            ) from None


# Where a container sees its deployment's async spool (deployer/serving/async_spool.py).
CONTAINER_ASYNC_DIR = "/modelport-async"


def _async_mount(options: dict[str, Any], spec: LaunchSpec, source: Path) -> None:
    """Mount the deployment's spool read-write and tell the runtime about it.

    The spool's folders are group-writable and set-gid; the container's user must be in
    their group. As root the portal gives them the runtime's group; otherwise the
    container joins the portal's group (``group_add``), never the root group.
    """
    assert spec.async_dir is not None
    folder = spec.async_dir
    if os.geteuid() == 0:
        for path in (folder, *(p for p in folder.iterdir() if p.is_dir())):
            os.chown(path, -1, RUNTIME_UID)
    else:
        options["group_add"] = [str(folder.stat().st_gid)]
    options.setdefault("volumes", {})[str(source)] = {"bind": CONTAINER_ASYNC_DIR, "mode": "rw"}
    command = options.setdefault("command", ["--config", "/model/config.json"])
    command += [
        "--async-dir", CONTAINER_ASYNC_DIR,
        "--async-max-queue", str(spec.async_max_queue),
        "--async-callback-hosts", spec.async_callback_hosts,
    ]  # fmt: skip


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
                REPLICA: str(spec.replica_id),
                f"{LABEL_PREFIX}model": spec.model_name,
                f"{LABEL_PREFIX}model-version": spec.model_version,
            }
        )
        name = self.container_name(spec.revision_id, spec.replica_id)
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
        if spec.keys_file is not None:
            # The keys file's folder, not the file: the portal replaces the file by a
            # rename, which a file bind mount would never see.
            if self.settings.keys_volume:
                # The whole volume (Docker 20.10 mounts no sub-folder of one): every
                # deployment's keys file holds key digests only, never a key.
                source, inside = self.settings.keys_volume, spec.keys_file.parent.name
                keys_path = f"{CONTAINER_KEYS_DIR}/{inside}/{spec.keys_file.name}"
            else:
                source = str(self.settings.host_path(spec.keys_file.parent))
                keys_path = f"{CONTAINER_KEYS_DIR}/{spec.keys_file.name}"
            options["volumes"] = {source: {"bind": CONTAINER_KEYS_DIR, "mode": "ro"}}
            options["command"] = ["--config", "/model/config.json", "--keys-file", keys_path]
        if spec.async_dir is not None:
            _async_mount(options, spec, self.settings.host_path(spec.async_dir))
        if self.settings.network:
            options["network"] = self.settings.network
        else:
            options["ports"] = {
                f"{port}/tcp": (self.settings.publish_host, None) for port in SERVING_PORTS.values()
            }
        with contextlib.ExitStack() as placing:
            devices: tuple[str, ...] = ()
            if spec.device == "gpu":
                # Chosen and started under one lock: two rollouts never pick the same GPU.
                placing.enter_context(placement_lock(self.settings.log_dir.parent / "gpu.lock"))
                devices = place(self._gpu_inventory(), self.gpus_in_use(), spec.gpus)
                options["device_requests"] = [
                    DeviceRequest(device_ids=list(devices), capabilities=[["gpu"]])
                ]
                options["labels"] = {**labels, GPUS: ",".join(devices)}
            return dataclasses.replace(self._create_and_start(spec, options), gpus=devices)

    def _gpu_inventory(self) -> tuple[str, ...]:
        return self.settings.gpu_devices or discover_inventory()

    def gpus_in_use(self) -> dict[str, str]:
        """Device id -> the container of ours holding it (running or not yet removed)."""
        held: dict[str, str] = {}
        for container in self._list(all_states=True):
            labels = container.labels or {}
            for device in filter(None, labels.get(GPUS, "").split(",")):
                held[device] = (
                    f"deployment {labels.get(DEPLOYMENT, '?')} revision {labels.get(REVISION, '?')}"
                )
        return held

    def _create_and_start(self, spec: LaunchSpec, options: dict[str, Any]) -> LaunchResult:
        from docker.errors import APIError, ImageNotFound

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
                    replica_id=_int(labels.get(REPLICA)),
                )
            )
        return instances

    def exits(self, stop: threading.Event) -> Iterator[InstanceExit]:
        """Our containers' deaths as the engine reports them (its event stream), until
        ``stop`` is set; an ``oom`` event marks the ``die`` that follows it."""
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        since = int(time.time())
        oom: set[str] = set()
        while not stop.is_set():
            try:
                stream = self.client.events(
                    decode=True,
                    since=since,
                    filters={
                        "type": "container",
                        "event": ["die", "oom"],
                        "label": f"{MANAGED}={self.settings.installation}",
                    },
                )
            except (DockerException, RequestException):
                stop.wait(1.0)
                continue
            closer = threading.Thread(target=lambda s=stream: (stop.wait(), s.close()), daemon=True)
            closer.start()
            try:
                for event in stream:
                    since = max(since, int(event.get("time", since)))
                    actor = event.get("Actor") or {}
                    handle = str(actor.get("ID", ""))
                    attributes = actor.get("Attributes") or {}
                    if event.get("status", event.get("Action")) == "oom":
                        oom.add(handle)
                        continue
                    yield self._exit_from(handle, attributes, oom_seen=handle in oom)
                    oom.discard(handle)
            except (DockerException, RequestException, ValueError, AttributeError):
                if not stop.is_set():
                    stop.wait(0.5)  # the stream broke (an engine restart): read it again

    def _exit_from(
        self, handle: str, attributes: dict[str, str], *, oom_seen: bool
    ) -> InstanceExit:

        code = _int(attributes.get("exitCode"), default=-1)
        killed = ""
        if code > 128:
            with contextlib.suppress(ValueError):
                killed = signal.Signals(code - 128).name
        oom = oom_seen
        if not oom:
            # The engine records an OOM kill on the container even when no event said so.
            container = self._ours(handle) if _CONTAINER_ID.match(handle) else None
            with contextlib.suppress(Exception):
                oom = bool(
                    ((container.attrs if container else {}).get("State") or {}).get("OOMKilled")
                )
        return InstanceExit(
            runtime=self.name,
            handle=handle,
            deployment_id=_int(attributes.get(DEPLOYMENT)),
            revision_id=_int(attributes.get(REVISION)),
            replica_id=_int(attributes.get(REPLICA)),
            exit_code=code if code >= 0 else None,
            signal=killed,
            oom=oom,
        )

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

    def stop_log_shipper(self, *, timeout_s: float = 2.0) -> bool:
        """Stop this installation's log shipper (it would linger until idle otherwise);
        whether one was running. It gets SIGTERM, then SIGKILL after ``timeout_s``."""
        pid_file = self.settings.log_dir / "shipper.pid"
        if not _process_alive(pid_file):
            return False
        pid = int(json.loads(pid_file.read_text())["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _process_alive(pid_file) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _process_alive(pid_file):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(pid)
        pid_file.unlink(missing_ok=True)
        return True

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
    def container_name(self, revision_id: int, replica_id: int = 0) -> str:
        """One name per revision and replica: the engine refuses a second container for it."""
        base = f"mp-{self.settings.installation}-r{revision_id}"
        return f"{base}-p{replica_id}" if replica_id else base

    def _list(self, *, all_states: bool) -> list[Any]:
        """Our containers. docker-py lists, then inspects each one: a container removed in
        between (another rollout's, at the same moment) fails the whole list with NotFound,
        so the list is asked again."""
        from docker.errors import NotFound

        ours = {"label": f"{MANAGED}={self.settings.installation}"}
        for _ in range(LIST_ATTEMPTS - 1):
            try:
                return list(self.client.containers.list(all=all_states, filters=ours))
            except NotFound:
                continue
        return list(self.client.containers.list(all=all_states, filters=ours))

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


def _int(value: str | None, *, default: int = 0) -> int:
    try:
        return int(value or default)
    except ValueError:
        return default


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


def _reap(pid: int) -> None:
    """Collect a child that has exited (the shipper is one when this process started it)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


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
    """Follow every running container of this installation into files, until idle or
    until SIGTERM/SIGINT (then it exits within ``poll_s``)."""
    client = docker_client(timeout_s=24 * 3600)
    followers: dict[str, threading.Thread] = {}
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    idle_since = time.monotonic()
    while log_dir.is_dir() and not stop.is_set():
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
        stop.wait(poll_s)
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
