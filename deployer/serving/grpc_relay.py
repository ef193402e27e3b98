"""Connections accepted on a handed-over gRPC socket, relayed to this process's grpcio server.

grpcio's server binds its own ports and cannot take a listening socket from elsewhere, so
the stable gRPC address that instances hand to each other (``listen_socket``) is served by
a byte relay: each accepted connection is joined to a fresh loopback connection to the
instance's own gRPC port. HTTP/2 framing, flow control, limits and deadlines all stay
grpcio's; the relay copies bytes, with back-pressure both ways (a side that cannot
write makes the other stop reading), and a cap on open connections.

Draining is the one thing grpcio cannot do for a relayed connection: stopping grpcio's
server while a client keeps calling cancels the calls that arrive during the stop
(CANCELLED, measured), and the client may not retry those. So the relay reads the frame
headers going by (hyperframe: lengths, types, stream ids, END_STREAM; nothing is
changed or held back) and, when the instance drains, puts a GOAWAY of its own between
two of grpcio's frames, naming the last stream it has passed on. The client sends its
next calls on a new connection (to the next instance: this one no longer accepts), and
retries on its own any stream it sent after that last one (RFC 9113 section 6.8). The
relay closes the connection when the streams it passed on have all ended; only then is
grpcio's server stopped, with nobody left calling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

log = logging.getLogger("deployer.serving.grpc_relay")


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER = 9
# Streams tracked per connection; past this (grpcio refuses far fewer) a drain just closes.
_MAX_TRACKED = 4096


class FrameCursor:
    """Follows one direction of an HTTP/2 byte stream frame by frame, without holding bytes.

    ``feed`` reports each complete frame header (type and flags parsed by hyperframe);
    ``at_boundary`` is true between frames, where a frame of our own may be written.
    """

    def __init__(self, preface: bytes = b"") -> None:
        self._preface = len(preface)
        self._header = bytearray()
        self._left = 0  # payload bytes of the current frame still to come

    @property
    def at_boundary(self) -> bool:
        return self._preface == 0 and self._left == 0 and not self._header

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            if self._preface:
                step = min(self._preface, len(view))
                self._preface -= step
                view = view[step:]
            elif self._left:
                step = min(self._left, len(view))
                self._left -= step
                view = view[step:]
            else:
                step = min(_HEADER - len(self._header), len(view))
                self._header += view[:step]
                view = view[step:]
                if len(self._header) == _HEADER:
                    frame, length = Frame.parse_frame_header(memoryview(bytes(self._header)))
                    self._header.clear()
                    self._left = length
                    frames.append(frame)
        return frames


class _Upstream(asyncio.Protocol):
    """The loopback side: grpcio's answers go back to the client."""

    def __init__(self, relay: GrpcRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.relay.send_to_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close()

    def pause_writing(self) -> None:
        self.relay.pause_client()

    def resume_writing(self) -> None:
        self.relay.resume_client()


class RelayLimits:
    """How many relayed connections may be open at once (the listener's connection cap),
    and which ones, so a drain can reach each of them."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = 0
        self.relays: set[GrpcRelay] = set()

    async def drain(self, timeout_s: float) -> int:
        """GOAWAY on every relayed connection; wait until they have closed (at most
        ``timeout_s``); close what is left. Returns how many had to be closed."""
        relays = list(self.relays)
        for relay in relays:
            relay.drain()
        waits = [asyncio.ensure_future(relay.drained.wait()) for relay in relays]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for wait in pending:
                wait.cancel()
        left = [relay for relay in relays if not relay.drained.is_set()]
        for relay in left:
            relay.close()
        return len(left)


class GrpcRelay(asyncio.Protocol):
    """One client connection on the public gRPC socket, joined to ``target``."""

    def __init__(self, target: tuple[str, int], limits: RelayLimits) -> None:
        self.target = target
        self.limits = limits
        self.client: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self._counted = False
        self._closed = False
        # What the client sent before the loopback side was up (pause_reading may let a
        # first read through).
        self._early: list[bytes] = []
        self._from_client = FrameCursor(_PREFACE)
        self._to_client = FrameCursor()
        self._last_stream = 0  # the highest stream the client opened and we passed on
        self._open: set[int] = set()
        self._tracking = True
        self._draining = False
        self._goaway_sent = False
        self.drained = asyncio.Event()

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self.client = transport
        if self.limits.open >= self.limits.max_connections:
            transport.abort()  # over the cap: refuse, as the grpcio listener would
            return
        self.limits.open += 1
        self.limits.relays.add(self)
        self._counted = True
        transport.pause_reading()  # nothing to forward to until the loopback side is up
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self), *self.target)
        except OSError as exc:
            log.warning("gRPC relay cannot reach %s:%s: %s", *self.target, exc)
            self.close()
            return
        self.upstream = upstream
        if self._closed:
            self.close()
            return
        if upstream.transport is not None:
            for chunk in self._early:
                upstream.transport.write(chunk)
        self._early.clear()
        if self.client is not None:
            self.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._tracking:
            try:
                frames = self._from_client.feed(data)
            except Exception:  # not HTTP/2 after all: grpcio will say so; stop following
                frames, self._tracking = [], False
            for frame in frames:
                sid = frame.stream_id
                if isinstance(frame, HeadersFrame) and sid % 2 == 1 and sid > self._last_stream:
                    self._last_stream = sid
                    self._open.add(sid)
                    if len(self._open) > _MAX_TRACKED:
                        self._tracking = False
                elif isinstance(frame, RstStreamFrame):
                    self._open.discard(sid)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)
        else:
            self._early.append(data)

    def send_to_client(self, data: bytes) -> None:
        if self.client is None:
            return
        if self._tracking:
            try:
                frames = self._to_client.feed(data)
            except Exception:
                frames, self._tracking = [], False
            for frame in frames:
                ends = "END_STREAM" in frame.flags or isinstance(frame, RstStreamFrame)
                if ends and frame.stream_id:
                    self._open.discard(frame.stream_id)
        self.client.write(data)
        if self._draining:
            self._drain_step()

    def drain(self) -> None:
        """Move the client off this connection: GOAWAY now (between two frames), then
        close once every stream passed on has ended (see the module's docstring)."""
        self._draining = True
        self._drain_step()

    def _drain_step(self) -> None:
        if self._closed:
            return
        if not self._tracking:
            self.close()
            return
        if not self._goaway_sent:
            if not self._to_client.at_boundary:
                return  # in the middle of one of grpcio's frames: after it
            if self.client is not None:
                goaway = GoAwayFrame(0, last_stream_id=self._last_stream, error_code=0)
                self.client.write(goaway.serialize())
            self._goaway_sent = True
        if not self._open:
            self.close()

    # A side whose buffer is full stops the other side's reads.
    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def pause_client(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(RuntimeError):
                self.client.resume_reading()

    def eof_received(self) -> bool | None:
        upstream = self.upstream.transport if self.upstream is not None else None
        if upstream is not None and upstream.can_write_eof():
            upstream.write_eof()
        return True  # keep the client side open for the last answers

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        """End both sides (idempotent)."""
        self._closed = True
        self.drained.set()
        if self._counted:
            self._counted = False
            self.limits.open -= 1
            self.limits.relays.discard(self)
        if self.client is not None:
            self.client.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
