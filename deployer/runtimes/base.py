"""The interface every runtime implements: start, stop, status, logs, and what it owns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchResult:
    """What was started and where it answers."""

    handle: str
    url: str
    grpc_address: str = ""
    metrics_url: str = ""


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
