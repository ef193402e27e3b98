"""The parent of one local serving instance: it waits for the instance and records how it ended.

Only a process's parent can learn its exit status, and the deploy worker that starts an
instance does not live as long as the instance does. So the local runtime starts this
small keeper, which starts the instance, writes the instance's process id, waits, and
writes the exit status (code or signal) next to it before it exits itself. The replica
watcher (:mod:`deployer.runtimes.watch`) is told of the exit through a pidfd and reads
the status from that file: no poll.

Usage: ``python -m deployer.runtimes.keeper PID_FILE EXIT_FILE -- COMMAND...``. The
file descriptors the keeper inherits (the handed-over listening sockets) pass on to
the instance. SIGTERM and SIGINT reach the instance through its process group; the
keeper itself only waits for it to finish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def _inherited_fds() -> list[int]:
    """The descriptors above stdio this keeper holds (the listening sockets to pass on)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.fstat(fd)
            except OSError:
                continue  # the descriptor listdir itself used
            found.append(fd)
    return found


def _write(path: str, payload: dict[str, int]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle)
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: keeper PID_FILE EXIT_FILE -- COMMAND...", file=sys.stderr)
        return 2
    pid_file, exit_file, command = argv[0], argv[1], argv[3:]
    # A signal to the group reaches the instance too; the keeper outlives it to record it.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    inherited = _inherited_fds()
    child = subprocess.Popen(command, pass_fds=inherited)
    # Only the instance holds the listening sockets: a keeper's copy would keep an
    # address's accept queue open after its instance died.
    for fd in inherited:
        os.close(fd)
    _write(pid_file, {"pid": child.pid})
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
    _write(exit_file, {"returncode": code})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
