"""A stable address without a proxy: listening sockets handed from instance to instance.

A deployment's public REST and gRPC ports are two listening sockets that outlive every
instance. The first instance's runtime binds them; each instance inherits them (file
descriptors) and hands them on over a small Unix control socket (``SCM_RIGHTS``) to
the runtime that starts the next one. Old and new instance then hold *the same*
kernel socket, with one accept queue: a connection waiting in it is accepted by
whichever instance takes it, so closing the old instance's copy drops nothing, and no
request ever pays for a hop.

A new instance does not accept on the public sockets until it is told to
(``activate``): its readiness and known answer are checked on its private ports
first. The control socket speaks one line per connection:

- ``fds``: answer ``ok http grpc`` with the public sockets attached;
- ``activate``: start accepting on them, answer ``ok``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("deployer.serving")

_MAX_LINE = 64


class HandoverError(OSError):
    """The control socket did not answer as expected."""


def parse_fds(text: str) -> tuple[int, int]:
    """``"HTTP_FD,GRPC_FD"`` (GRPC_FD may be -1) as two descriptors."""
    try:
        http_fd, grpc_fd = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"listen_fds: expected HTTP_FD,GRPC_FD, got {text!r}") from None
    if http_fd < 0:
        raise ValueError("listen_fds: the REST descriptor must be given")
    return http_fd, grpc_fd


def _listening(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        sock.detach()
        raise ValueError(f"listen_fds: descriptor {fd} is not a listening socket")
    sock.setblocking(False)
    return sock


class PublicListeners:
    """The inherited public sockets of one instance, and its control socket."""

    def __init__(self, listen_fds: str, control: str) -> None:
        http_fd, grpc_fd = parse_fds(listen_fds)
        self.http = _listening(http_fd)
        self.grpc = _listening(grpc_fd) if grpc_fd >= 0 else None
        self.control = Path(control)
        self.servers: list[asyncio.base_events.Server] = []
        self._control: socket.socket | None = None

    @property
    def active(self) -> bool:
        return bool(self.servers)

    async def start_control(
        self,
        http_factory: Callable[[], asyncio.Protocol],
        grpc_factory: Callable[[], asyncio.Protocol] | None,
    ) -> None:
        """Answer ``fds`` and ``activate`` on the control socket (a thread: the reply
        carries descriptors, which event-loop transports cannot send)."""
        loop = asyncio.get_running_loop()

        async def activate() -> None:
            if self.servers:
                return
            pairs = [(self.http, http_factory), (self.grpc, grpc_factory)]
            for sock, factory in pairs:
                if sock is not None and factory is not None:
                    server = await loop.create_server(factory, sock=sock, backlog=1024)
                    self.servers.append(server)
            log.info("accepting on the stable address", extra={"event": "public_active"})

        def answer(conn: socket.socket) -> None:
            line = conn.recv(_MAX_LINE).strip()
            if line == b"activate":
                asyncio.run_coroutine_threadsafe(activate(), loop).result(timeout=10)
                conn.sendall(b"ok\n")
            elif line == b"fds":
                fds = [self.http.fileno()] + ([self.grpc.fileno()] if self.grpc else [])
                socket.send_fds(conn, [b"ok\n"], fds)
            else:
                conn.sendall(b"error unknown command\n")

        def serve(listener: socket.socket) -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed: the instance is draining
                with conn:
                    conn.settimeout(10)
                    try:
                        answer(conn)
                    except Exception as exc:  # one bad caller must not end the thread
                        log.warning("control socket: %s", exc, extra={"event": "control_error"})

        self.control.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.control))
        os.chmod(self.control, 0o600)
        listener.listen(8)
        self._control = listener
        threading.Thread(target=serve, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Stop accepting on the public sockets (the next instance's copy keeps them)."""
        for server in self.servers:
            server.close()
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.shutdown(socket.SHUT_RDWR)
            self._control.close()
            self.control.unlink(missing_ok=True)
        for sock in (self.http, self.grpc):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


# ------------------------------------------------------------ the runtime's side


def bind_public(host: str, port: int) -> socket.socket:
    """A new public listening socket on ``host:port`` (when no instance holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def fetch_fds(control: Path, *, timeout_s: float = 5.0) -> list[socket.socket]:
    """The public sockets of the live instance behind ``control`` (REST first)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(control))
        conn.sendall(b"fds\n")
        message, fds, _flags, _addr = socket.recv_fds(conn, _MAX_LINE, 2)
    if not message.startswith(b"ok") or not fds:
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"{control} did not hand over its sockets ({message!r})")
    return [socket.socket(fileno=fd) for fd in fds]


def activate(control: Path, *, timeout_s: float = 5.0) -> None:
    """Tell the instance behind ``control`` to accept on the public sockets."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(control))
        conn.sendall(b"activate\n")
        answer = conn.recv(_MAX_LINE)
    if not answer.startswith(b"ok"):
        raise HandoverError(f"{control} did not take the stable address ({answer!r})")
