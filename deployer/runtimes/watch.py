"""Tell of serving instances' deaths as they happen, from the runtimes themselves.

- Local processes: a pidfd per instance (``os.pidfd_open``) turns readable the moment
  the process ends; how it ended (exit code or signal) is in the file its keeper
  (:mod:`deployer.runtimes.keeper`) wrote.
- Containers: the Docker engine's event stream (``die``, ``oom``), read as it comes.

The state folder of the local runtime is looked at again every ``rescan_s`` for
instances started since (births); deaths are never found by polling.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Sequence

from deployer.runtimes.base import InstanceExit
from deployer.runtimes.docker import DockerRuntime
from deployer.runtimes.local import LocalProcessRuntime, _start_time

log = logging.getLogger(__name__)

OnExit = Callable[[InstanceExit], None]


def _safely(on_exit: OnExit, ended: InstanceExit) -> None:
    try:
        on_exit(ended)
    except Exception:  # one bad report must not end the watch
        log.exception("handling the end of %s failed", ended.handle)


class LocalExitWatcher:
    """Watches the local runtime's instances through pidfds."""

    def __init__(self, runtime: LocalProcessRuntime, *, rescan_s: float = 0.5) -> None:
        self.runtime = runtime
        self.rescan_s = rescan_s
        self._fds: dict[str, int] = {}  # handle -> pidfd of an instance still running
        self._reported: set[str] = set()  # ended and told; kept until its state is gone

    def run(self, on_exit: OnExit, stop: threading.Event) -> None:
        """Report every instance that ends until ``stop`` is set."""
        try:
            while not stop.is_set():
                self._adopt(on_exit)
                by_fd = {fd: handle for handle, fd in self._fds.items()}
                ready, _, _ = select.select(list(by_fd), [], [], self.rescan_s)
                for fd in ready:
                    self._ended(by_fd[fd], on_exit)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _adopt(self, on_exit: OnExit) -> None:
        """Open a pidfd for every instance started since the last look."""
        handles = {instance.handle for instance in self.runtime.owned()}
        self._reported &= handles
        for handle in list(self._fds):
            if handle not in handles:  # stopped on purpose and removed
                os.close(self._fds.pop(handle))
        for handle in handles - set(self._fds) - self._reported:
            target = self.runtime.watch_target(handle)
            if target is None:
                continue
            pid, started = target
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = -1
            if fd >= 0 and _start_time(pid) != started:
                os.close(fd)  # the id belongs to another process now: ours has ended
                fd = -1
            if fd < 0:
                self._report(handle, on_exit)
            else:
                self._fds[handle] = fd

    def _ended(self, handle: str, on_exit: OnExit) -> None:
        fd = self._fds.pop(handle, None)
        if fd is not None:
            os.close(fd)
        self._report(handle, on_exit)

    def _report(self, handle: str, on_exit: OnExit) -> None:
        self._reported.add(handle)
        ended = self._exit_of(handle)
        if ended is not None:
            _safely(on_exit, ended)

    def _exit_of(self, handle: str) -> InstanceExit | None:
        """The keeper's record; it writes it a moment after the instance ends."""
        pause = threading.Event()
        for _ in range(100):
            ended = self.runtime.exit_of(handle)
            if ended is not None:
                return ended
            if self.runtime.watch_target(handle) is None:
                return None  # stopped and removed on purpose meanwhile
            pause.wait(0.01)
        instance = next((i for i in self.runtime.owned() if i.handle == handle), None)
        if instance is None:
            return None
        return InstanceExit(
            runtime=self.runtime.name,
            handle=handle,
            deployment_id=instance.deployment_id,
            revision_id=instance.revision_id,
            replica_id=instance.replica_id,
        )


def _watch_local(runtime: LocalProcessRuntime, on_exit: OnExit, stop: threading.Event) -> None:
    LocalExitWatcher(runtime).run(on_exit, stop)


def _watch_docker(runtime: DockerRuntime, on_exit: OnExit, stop: threading.Event) -> None:
    for ended in runtime.exits(stop):
        _safely(on_exit, ended)


def watch_exits(
    runtimes: Sequence[object], on_exit: OnExit, stop: threading.Event
) -> list[threading.Thread]:
    """Start one watching thread per runtime; each ends when ``stop`` is set."""
    threads = []
    for runtime in runtimes:
        watch: Callable[..., None]
        if isinstance(runtime, LocalProcessRuntime):
            watch = _watch_local
        elif isinstance(runtime, DockerRuntime):
            watch = _watch_docker
        else:
            continue
        thread = threading.Thread(
            target=watch, args=(runtime, on_exit, stop), name=f"watch-{runtime.name}", daemon=True
        )
        thread.start()
        threads.append(thread)
    return threads
