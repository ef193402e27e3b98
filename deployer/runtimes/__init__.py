"""Runtimes that run serving instances: local processes now, containers later."""

from deployer.runtimes.base import (
    InstanceState,
    InstanceStatus,
    LaunchResult,
    LaunchSpec,
    OwnedInstance,
    Runtime,
)

__all__ = [
    "InstanceState",
    "InstanceStatus",
    "LaunchResult",
    "LaunchSpec",
    "OwnedInstance",
    "Runtime",
]
