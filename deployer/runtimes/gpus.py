"""Which GPUs an instance gets: the host's inventory, the ones in use, and the choice.

A GPU deployment asks for a number of GPUs, or for specific device ids, and each of its
instances gets only those (a container's device request names them; a local process
sees them through ``CUDA_VISIBLE_DEVICES``). GPUs are not shared: an instance takes
free ones, so the replicas of a deployment spread over the free GPUs, and when too few
are free the start is refused with a sentence that says which are taken, and by what.

The choice is made under a file lock held across "look at what is in use, then start",
so two rollouts on one host never pick the same GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from deployer.errors import LaunchError

_DEVICE_ID = re.compile(r"^(?:\d{1,3}|GPU-[0-9a-fA-F-]{8,64}|MIG-[0-9a-zA-Z/-]{8,80})$")
MAX_GPUS = 64


class GpuPlacementError(LaunchError):
    """The GPUs asked for cannot be given; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="gpu_unavailable")


@dataclass(frozen=True)
class GpuRequest:
    """``count`` GPUs, or exactly ``device_ids`` (then count is their number)."""

    count: int = 1
    device_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for device in self.device_ids:
            if not _DEVICE_ID.match(device):
                raise GpuPlacementError(
                    f"{device!r} is not a GPU device id (an index such as 0, or a GPU-/MIG- UUID)."
                )
        if len(set(self.device_ids)) != len(self.device_ids):
            raise GpuPlacementError(f"GPU ids are repeated: {', '.join(self.device_ids)}.")
        wanted = len(self.device_ids) or self.count
        if not 1 <= wanted <= MAX_GPUS:
            raise GpuPlacementError(
                f"A GPU deployment asks for 1 to {MAX_GPUS} GPUs, not {wanted}."
            )

    @property
    def wanted(self) -> int:
        return len(self.device_ids) or self.count

    @classmethod
    def parse(cls, count: int, device_ids: str) -> GpuRequest:
        """From settings or a row: ``device_ids`` is a comma-separated list (or empty)."""
        ids = tuple(part.strip() for part in device_ids.split(",") if part.strip())
        return cls(count=len(ids) or count, device_ids=ids)


def parse_inventory(text: str) -> tuple[str, ...]:
    """``"0,1,2"`` (the operator's setting) as device ids, checked."""
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    for device in ids:
        if not _DEVICE_ID.match(device):
            raise GpuPlacementError(f"GPU inventory: {device!r} is not a GPU device id.")
    return ids


def discover_inventory() -> tuple[str, ...]:
    """The GPUs ``nvidia-smi`` lists on this host (none when it is not installed)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_inventory(",".join(out.split()))


def place(
    inventory: tuple[str, ...], in_use: Mapping[str, str], request: GpuRequest
) -> tuple[str, ...]:
    """The GPUs to give: ``request.device_ids`` when all are free, else the first free
    ones of ``inventory``. ``in_use`` maps a device id to who holds it (for the message)."""
    if not inventory:
        raise GpuPlacementError(
            "No GPUs are known on this host: nvidia-smi lists none and MODELPORT_GPU_DEVICES "
            "is not set."
        )
    free = [device for device in inventory if device not in in_use]
    if request.device_ids:
        unknown = [d for d in request.device_ids if d not in inventory]
        if unknown:
            raise GpuPlacementError(
                f"GPU {', '.join(unknown)} does not exist on this host "
                f"(it has {', '.join(inventory)})."
            )
        busy = [f"GPU {d} is used by {in_use[d]}" for d in request.device_ids if d in in_use]
        if busy:
            raise GpuPlacementError("The GPUs asked for are not free: " + "; ".join(busy) + ".")
        return request.device_ids
    if len(free) < request.wanted:
        taken = "; ".join(f"GPU {d}: {who}" for d, who in sorted(in_use.items()))
        raise GpuPlacementError(
            f"{request.wanted} GPU{'s' if request.wanted > 1 else ''} asked for, "
            f"{len(free)} free of {len(inventory)}" + (f" (in use: {taken})." if taken else ".")
        )
    return tuple(free[: request.wanted])


@contextlib.contextmanager
def placement_lock(path: Path) -> Iterator[None]:
    """Held while GPUs are chosen and the instance that gets them is started."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
