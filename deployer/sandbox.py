"""Run engine steps in a child process with memory and time limits.

A malformed or hostile model can crash onnxruntime or allocate without bound. Such
work runs in a child interpreter with ``RLIMIT_AS`` and a wall-clock timeout, so a
bad upload fails its version and never the worker that drives the jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError, LimitExceeded

# Exit status a child uses after writing a handled error to its result file.
HANDLED_ERROR_EXIT = 3
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Limits:
    """What a child may use."""

    memory_mb: int = 4096
    timeout_s: float = 300.0
    file_size_mb: int = 16384
    threads: int = 1


@dataclass(frozen=True)
class ChildOutcome:
    """What a child left behind: its result document and how long it ran."""

    result: dict[str, Any]
    duration_s: float
    stderr_tail: str


def _limit_preexec(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        file_size = limits.file_size_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()

    return apply


def _child_env(limits: Limits) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    threads = str(limits.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_child(
    module: str,
    args: list[str],
    *,
    work_dir: Path,
    limits: Limits,
    on_poll: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> ChildOutcome:
    """Run ``python -m module args`` in ``work_dir`` under ``limits``.

    The child writes ``result.json`` into ``work_dir``. A handled failure there is
    raised again here as a ``DeployerError`` with the child's code and message.
    ``on_poll`` is called about four times a second while the child runs (to relay
    its progress); ``env`` adds variables to the child's small environment.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    result_path = work_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    stderr_path = work_dir / "stderr.log"
    started = time.monotonic()
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--result", str(result_path)],
            cwd=work_dir,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={**_child_env(limits), **(env or {})},
            preexec_fn=_limit_preexec(limits),
        )
        try:
            returncode = _wait(proc, limits.timeout_s, on_poll)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise LimitExceeded(
                f"The step took longer than its {limits.timeout_s:.0f} s limit and was stopped. "
                "A model this slow to load or run needs a larger limit "
                "(MODELPORT_VALIDATION_TIMEOUT_S) or a smaller model.",
                code="timeout",
            ) from None
    duration = time.monotonic() - started
    stderr_tail = _tail(stderr_path)
    result = read_result(result_path)
    if returncode == 0 and result is not None:
        return ChildOutcome(result=result, duration_s=duration, stderr_tail=stderr_tail)
    if returncode == HANDLED_ERROR_EXIT and result is not None:
        raise DeployerError(str(result.get("message")), code=str(result.get("code", "error")))
    raise _crash_error(returncode, stderr_tail, limits)


def _wait(
    proc: subprocess.Popen[bytes], timeout_s: float, on_poll: Callable[[], None] | None
) -> int:
    if on_poll is None:
        return proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            on_poll()
            if time.monotonic() >= deadline:
                raise


def _crash_error(returncode: int, stderr_tail: str, limits: Limits) -> DeployerError:
    memory_hint = any(
        marker in stderr_tail
        for marker in ("MemoryError", "bad_alloc", "Failed to allocate", "Cannot allocate memory")
    )
    if memory_hint:
        return LimitExceeded(
            f"The model needed more than the {limits.memory_mb} MB memory limit. Raise "
            "MODELPORT_VALIDATION_MEMORY_MB if the model is really this large.",
            code="out_of_memory",
        )
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return DeployerError(
            f"The model crashed the process that loaded it ({name}). The file is probably "
            "corrupt or uses an operator onnxruntime cannot run. "
            f"Last output: {stderr_tail[-500:]}",
            code="crashed",
        )
    return DeployerError(
        f"The step failed unexpectedly (exit status {returncode}). "
        f"Last output: {stderr_tail[-800:] or 'none'}",
        code="crashed",
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def read_result(path: Path) -> dict[str, Any] | None:
    """A child's result document, or None if it is missing or not a JSON object."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a child's result document atomically (used by the child side)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.replace(path)
