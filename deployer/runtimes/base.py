"""The interface every runtime implements: start, stop, status, logs, and what it owns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from deployer.runtimes.gpus import GpuRequest


@dataclass(frozen=True)
class LaunchSpec:
    """What to run for one revision of a deployment."""

    deployment_id: int
    revision_id: int
    model_name: str
    model_version: str
    model_path: Path
    image: str = ""
    device: str = "cpu"
    cpus: float = 1.0
    memory_mb: int = 1024
    pids_limit: int = 256
    # The version's recorded sample (.npz) to warm up with; a model image carries its own.
    warmup_sample: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # The deployment's inference keys file (deployer.keys); None: the instance is open.
    keys_file: Path | None = None
    # With device "gpu": how many GPUs, or which (deployer.runtimes.gpus); one by default.
    gpus: GpuRequest = field(default_factory=GpuRequest)
    # The deployment's async spool folder (deployer.serving.async_spool); None: no async.
    async_dir: Path | None = None
    async_max_queue: int = 1000
    async_callback_hosts: str = ""
    # The replica this instance is (the portal's row id); 0: a revision's only instance.
    replica_id: int = 0


@dataclass(frozen=True)
class LaunchResult:
    """What was started and where it answers."""

    handle: str
    url: str
    grpc_address: str = ""
    metrics_url: str = ""
    # The deployment's stable address, which the instance serves once it takes it over
    # (a runtime that hands addresses between instances; empty otherwise).
    public_url: str = ""
    public_grpc: str = ""
    # The GPUs (device ids) placed for it; empty on the CPU.
    gpus: tuple[str, ...] = ()


class InstanceState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"
    MISSING = "missing"


@dataclass(frozen=True)
class InstanceStatus:
    """The runtime's view of one instance."""

    state: InstanceState
    detail: str = ""


@dataclass(frozen=True)
class OwnedInstance:
    """An instance this runtime started, with the ids it was labelled with."""

    handle: str
    deployment_id: int
    revision_id: int
    state: InstanceState
    replica_id: int = 0


@dataclass(frozen=True)
class InstanceExit:
    """An instance that stopped, as its runtime saw it end (not as a poll found it)."""

    runtime: str
    handle: str
    deployment_id: int
    revision_id: int
    replica_id: int
    # Exit code when it exited, None when a signal ended it (then ``signal`` names it).
    exit_code: int | None = None
    signal: str = ""
    oom: bool = False

    @property
    def cause(self) -> str:
        """Why it ended, in words: out of memory, a signal, or an exit code."""
        if self.oom:
            return "killed for running out of memory (OOM)"
        if self.signal:
            code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
            return f"killed by signal {self.signal}{code}"
        if self.exit_code is None:
            return "exited (no exit status was recorded)"
        return f"exited with code {self.exit_code}"


class Runtime(Protocol):
    """Runs serving instances; the portal talks to every runtime through this."""

    name: str

    def start(self, spec: LaunchSpec) -> LaunchResult:
        """Start an instance; return as soon as it is started, before it is ready."""
        ...

    def stop(self, handle: str, *, grace_s: float = 10.0) -> None:
        """Stop an instance, letting in-flight requests finish within ``grace_s``."""
        ...

    def status(self, handle: str) -> InstanceStatus:
        """Whether an instance is still running."""
        ...

    def logs(self, handle: str, *, tail: int = 200) -> str:
        """The last ``tail`` lines the instance wrote."""
        ...

    def owned(self) -> list[OwnedInstance]:
        """Every instance this runtime started and has not removed."""
        ...


@runtime_checkable
class HandsOverAddress(Protocol):
    """A runtime whose instances pass a deployment's stable address to one another."""

    def take_over(self, handle: str) -> None:
        """Make the instance serve its deployment's stable address (the previous one
        keeps serving what it holds until it is stopped)."""
        ...
