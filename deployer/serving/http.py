"""The REST front end: an asyncio protocol on httptools speaking the V2 REST API."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque

import httptools

from deployer.serving.app import ServingApp
from deployer.serving.codec import decode_infer_request, dumps, encode_infer_response
from deployer.serving.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServingError,
    Unauthorized,
)
from deployer.serving.model import Array

log = logging.getLogger("deployer.serving")

_REASONS = {
    200: b"OK",
    202: b"Accepted",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"


def _response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = _JSON,
    keep_alive: bool = True,
    header_length: int | None = None,
    extra: bytes = b"",
) -> bytes:
    head = [
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        % (status, _REASONS.get(status, b"Unknown"), content_type, len(body))
    ]
    if header_length is not None:
        head.append(b"inference-header-content-length: %d\r\n" % header_length)
    if extra:
        head.append(extra)
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


def _error_body(message: str) -> bytes:
    return dumps({"error": message})


def _error_headers(exc: ServingError) -> bytes:
    if isinstance(exc, Unauthorized):
        return b"www-authenticate: Bearer\r\n"
    if isinstance(exc, RateLimited | Overloaded):
        return b"retry-after: %d\r\n" % exc.retry_after_s
    return b""


class _HeadTooLarge(Exception):
    """Raised inside an httptools callback to stop parsing a head over the limits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Slot:
    """One request on a connection, answered in the order requests arrived."""

    __slots__ = (
        "bytes_in",
        "data",
        "error",
        "keep_alive",
        "key",
        "method",
        "path",
        "start",
        "status",
    )

    def __init__(self, method: str, path: str, keep_alive: bool, bytes_in: int) -> None:
        self.method = method
        self.path = path
        self.keep_alive = keep_alive
        self.bytes_in = bytes_in
        self.start = time.perf_counter()
        self.data: bytes | None = None
        self.status = 0
        self.error: str | None = None
        self.key: str | None = None  # the id of the key that was accepted, for the log


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests with httptools and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.slots: deque[_Slot] = deque()
        self.closing = False
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._header_length: bytes | None = None
        self._encoding: bytes | None = None
        self._authorization: bytes | None = None
        # Prefer values, Content-Type and the callback URL: only read by async requests.
        self._async_headers: list[tuple[bytes, bytes]] = []
        self._expect_continue = False
        self._continue_due = False  # a 100 Continue waiting for earlier answers to go out
        self._header_bytes = 0
        self._head_bytes = 0  # bytes fed while a head is incomplete (catches one huge line)
        self._in_head = True
        self._in_message = False
        self._failed = False
        now = time.monotonic()
        self.head_started: float | None = None  # header timeout runs from here
        self.idle_since: float | None = now  # keep-alive timeout runs from here
        self.last_read = now

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        if len(self.server.connections) >= self.server.max_connections:
            self._failed = True
            self.closing = True
            self.server.refused += 1
            message = f"too many connections (limit {self.server.max_connections}); retry later"
            transport.write(  # type: ignore[attr-defined]
                _response(503, _error_body(message), keep_alive=False, extra=b"retry-after: 1\r\n")
            )
            transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing or self._failed:
            return
        self.last_read = time.monotonic()
        try:
            self.parser.feed_data(data)
        except _HeadTooLarge as exc:
            self._fail_connection(exc.status, exc.message)
            return
        except httptools.HttpParserUpgrade:
            self._fail_connection(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadTooLarge):
                self._fail_connection(cause.status, cause.message)
            else:
                self._fail_connection(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and self._in_message:
            self._head_bytes += len(data)
            if self._head_bytes > self.server.max_head_bytes:
                self._fail_connection(431, "request head is over the size limit")

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        now = time.monotonic()
        self._in_message = True
        self._in_head = True
        self._head_bytes = 0
        self._header_bytes = 0
        self.head_started = now
        self.idle_since = None
        self._authorization = None
        if self._async_headers:
            self._async_headers = []
        self._url = b""
        self._body = []
        self._body_size = 0
        self._too_large = False
        self._header_length = None
        self._encoding = None
        self._expect_continue = False

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.head_started = None
        if self._too_large:  # a declared length over the limit: answer now, do not read it
            raise _HeadTooLarge(
                413, f"request body is over the limit of {self.server.max_body_bytes} bytes"
            )
        # curl and others wait (a second, for curl) for "100 Continue" before a large body;
        # behind pipelined requests it must wait for their answers to keep the order.
        if self._expect_continue and not self._too_large and self.transport is not None:
            if self.slots:
                self._continue_due = True
            else:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_url(self, url: bytes) -> None:
        if len(self._url) + len(url) > self.server.max_url_bytes:
            raise _HeadTooLarge(
                414, f"request target is over the limit of {self.server.max_url_bytes} bytes"
            )
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.server.max_header_bytes:
            raise _HeadTooLarge(
                431, f"request headers are over the limit of {self.server.max_header_bytes} bytes"
            )
        lowered = name.lower()
        if lowered == b"authorization":
            self._authorization = value
        elif lowered == b"inference-header-content-length":
            self._header_length = value
        elif lowered == b"content-encoding":
            self._encoding = value.strip().lower()
        elif lowered in _ASYNC_HEADERS:
            self._async_headers.append((lowered, value))
        elif lowered == b"expect":
            self._expect_continue = value.strip().lower() == b"100-continue"
        elif lowered == b"content-length":
            try:
                if int(value) > self.server.max_body_bytes:
                    self._too_large = True
            except ValueError:
                pass  # httptools rejects a malformed Content-Length itself

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            self._too_large = True
            self._body = []
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._continue_due = False
        method = self.parser.get_method().decode("latin-1")
        url = self._url
        query = url.find(b"?")
        path = (url if query < 0 else url[:query]).decode("latin-1")
        keep_alive = bool(self.parser.should_keep_alive()) and not self.app.draining
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        slot = _Slot(method, path, keep_alive, self._body_size)
        self.slots.append(slot)
        self.app.inflight += 1
        if self._too_large:
            slot.keep_alive = False
            self._reply_error(
                slot,
                PayloadTooLarge(
                    f"request body is over the limit of {self.server.max_body_bytes} bytes"
                ),
            )
            return
        try:
            self.server.route(self, slot, method, path, body, self._header_length, self._encoding)
        except ServingError as exc:
            self._reply_error(slot, exc)
        except Exception as exc:  # a bug must answer 500 and keep the connection usable
            self.server.log_exception(exc)
            self._reply_error(slot, ServingError(f"internal error: {type(exc).__name__}"))

    # replies

    def reply(
        self,
        slot: _Slot,
        status: int,
        body: bytes,
        *,
        content_type: bytes = _JSON,
        header_length: int | None = None,
        extra: bytes = b"",
    ) -> None:
        """Complete `slot` with a response and send whatever is ready, in order."""
        slot.status = status
        slot.data = _response(
            status,
            body,
            content_type=content_type,
            keep_alive=slot.keep_alive,
            header_length=header_length,
            extra=extra,
        )
        self.app.inflight -= 1
        self.server.record(self, slot)
        slots = self.slots
        transport = self.transport
        while slots and slots[0].data is not None:
            done = slots.popleft()
            if transport is not None and not self.closing:
                transport.write(done.data)  # type: ignore[arg-type]
                if not done.keep_alive:
                    self.closing = True
                    transport.close()
        if not slots and transport is not None and not self.closing:
            if self._continue_due:
                self._continue_due = False
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not self._in_message:
                self.idle_since = time.monotonic()
        if self.server.closing and not slots and transport is not None and not self.closing:
            self.closing = True
            transport.close()

    def _reply_error(self, slot: _Slot, exc: ServingError) -> None:
        slot.error = exc.message
        self.reply(slot, exc.status, _error_body(exc.message), extra=_error_headers(exc))

    def _fail_connection(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed, after the answers owed before it, and close."""
        if self._failed or self.transport is None:
            return
        self._failed = True
        self._in_message = False
        self.head_started = None
        self.transport.pause_reading()
        slot = _Slot("-", "-", False, 0)
        self.slots.append(slot)
        self.app.inflight += 1
        self._reply_error(slot, _ConnectionError(status, message))

    def check_timeouts(self, now: float) -> None:
        """Close the connection when its head, idle keep-alive or body wait ran too long."""
        if self.closing or self._failed or self.transport is None:
            return
        server = self.server
        if self.head_started is not None and now - self.head_started > server.header_timeout_s:
            server.timed_out += 1
            self._fail_connection(
                408, f"request head not received within {server.header_timeout_s:g} s"
            )
        elif self.idle_since is not None and not self.slots:
            if now - self.idle_since > server.keepalive_timeout_s:
                server.timed_out += 1
                self.close_if_idle()
        elif (
            self._in_message
            and not self._in_head
            and now - self.last_read > server.keepalive_timeout_s
        ):
            server.timed_out += 1
            self._fail_connection(408, f"request body stalled for {server.keepalive_timeout_s:g} s")

    def authorization(self) -> str | None:
        """The current request's Authorization header, if any."""
        value = self._authorization
        return None if value is None else value.decode("latin-1")

    def close_if_idle(self) -> None:
        """Close the connection unless a request on it is still being answered."""
        if not self.slots and self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()


class HttpServer:
    """Routes V2 REST requests to the ServingApp."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app
        config = app.config
        self.max_body_bytes = config.max_body_bytes
        self.max_url_bytes = config.max_url_bytes
        self.max_header_bytes = config.max_header_bytes
        self.max_head_bytes = config.max_url_bytes + config.max_header_bytes + 4096
        self.header_timeout_s = config.header_timeout_s
        self.keepalive_timeout_s = config.keepalive_timeout_s
        self.max_connections = config.max_connections
        self.refused = 0
        self.timed_out = 0
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._ready_body = dumps({"ready": True})
        self._live_body = dumps({"live": True})
        name, version = app.config.model_name, app.config.model_version
        self._infer_paths = {
            f"/v2/models/{name}/infer",
            f"/v2/models/{name}/versions/{version}/infer",
        }

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful when `port` is 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, reuse_address=True, backlog=1024
        )
        self._sweep()
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def _sweep(self) -> None:
        """Once a second (not one timer per request): enforce the timeouts."""
        now = time.monotonic()
        for connection in list(self.connections):
            connection.check_timeouts(now)
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(min(1.0, self.header_timeout_s / 2), self._sweep)

    def stop_accepting(self) -> None:
        """Close the listening socket and idle keep-alive connections."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.close_if_idle()

    def close_all(self) -> None:
        """Drop every connection (after the drain timeout)."""
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()

    def log_exception(self, exc: BaseException) -> None:
        log.error(
            "unhandled error while answering a request",
            exc_info=exc,
            extra={"event": "internal_error"},
        )

    def record(self, connection: HttpConnection, slot: _Slot) -> None:
        access = self.app.access_log
        if access.enabled:
            access.record(
                protocol="http",
                method=slot.method,
                path=slot.path,
                status=slot.status,
                duration_s=time.perf_counter() - slot.start,
                bytes_in=slot.bytes_in,
                bytes_out=len(slot.data or b""),
                peer=connection.peer,
                error=slot.error,
                key=slot.key,
            )

    # routing

    def route(
        self,
        conn: HttpConnection,
        slot: _Slot,
        method: str,
        path: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
    ) -> None:
        app = self.app
        if method == "POST" and path in self._infer_paths:  # the hot path, without parsing
            if app.keys is not None:
                slot.key = app.authorize(conn.authorization())
            if not self._infer_async(conn, slot, body, path, header_length, encoding):
                self._infer(conn, slot, body, header_length, encoding)
            return
        parts = path.strip("/").split("/")
        if not parts or parts[0] != "v2":
            raise NotFound(f"no route for {path}")
        count = len(parts)
        # Health (server and model readiness) stays open, like gRPC's *Ready RPCs.
        is_health = (count == 3 and parts[1] == "health") or (count >= 4 and parts[-1] == "ready")
        if app.keys is not None and not is_health:
            slot.key = app.authorize(conn.authorization())
        if count == 1:
            self._expect(method, "GET")
            conn.reply(slot, 200, dumps(app.server_metadata()))
            return
        if parts[1] == "health" and count == 3:
            self._expect(method, "GET")
            if parts[2] == "live":
                conn.reply(slot, 200, self._live_body)
                return
            if parts[2] == "ready":
                self._reply_ready(conn, slot)
                return
            raise NotFound(f"no route for {path}")
        if parts[1] != "models" or count < 3:
            raise NotFound(f"no route for {path}")
        if count == 3 and parts[2] == "stats":
            # GET /v2/models/stats: statistics of every model (there is one).
            self._expect(method, "GET")
            conn.reply(slot, 200, dumps(app.model_stats()))
            return
        name = parts[2]
        version: str | None = None
        rest = parts[3:]
        if len(rest) >= 2 and rest[0] == "versions":
            version = rest[1]
            rest = rest[2:]
        app.check_model(name, version)
        if not rest:
            self._expect(method, "GET")
            conn.reply(slot, 200, dumps(app.model_metadata()))
            return
        if len(rest) == 2 and rest[0] == "async" and app.async_front is not None:
            self._expect(method, "GET")
            app.async_front.poll(conn, slot, rest[1])
            return
        if len(rest) != 1:
            raise NotFound(f"no route for {path}")
        action = rest[0]
        if action == "infer":
            self._expect(method, "POST")
            if not self._infer_async(conn, slot, body, path, header_length, encoding):
                self._infer(conn, slot, body, header_length, encoding)
            return
        self._expect(method, "GET")
        if action == "ready":
            self._reply_ready(conn, slot)
        elif action == "config":
            conn.reply(slot, 200, dumps(app.model_config()))
        elif action == "stats":
            conn.reply(slot, 200, dumps(app.model_stats()))
        else:
            raise NotFound(f"no route for {path}")

    @staticmethod
    def _expect(method: str, wanted: str) -> None:
        if method != wanted:
            raise _MethodNotAllowed(f"method {method} is not allowed here; use {wanted}")

    def _reply_ready(self, conn: HttpConnection, slot: _Slot) -> None:
        problem = self.app.readiness_error()
        if problem is None:
            conn.reply(slot, 200, self._ready_body)
        else:
            slot.error = problem
            conn.reply(slot, 503, dumps({"ready": False, "error": problem}))

    def _infer_async(
        self,
        conn: HttpConnection,
        slot: _Slot,
        body: bytes,
        path: str,
        header_length: bytes | None,
        encoding: bytes | None,
    ) -> bool:
        """Spool the request when it asks for respond-async and this deployment has a
        spool (deployer/serving/async_http.py); False: answer it synchronously."""
        front = self.app.async_front
        extra = conn._async_headers
        if front is None or not extra:
            return False
        prefer = [v.decode("latin-1") for n, v in extra if n == b"prefer"]
        if not front.wants_async(prefer):
            return False
        headers = {n.decode(): v.decode("latin-1") for n, v in extra if n != b"prefer"}
        if header_length is not None:
            headers["inference-header-content-length"] = header_length.decode("latin-1")
        if encoding:
            headers["content-encoding"] = encoding.decode("latin-1")
        front.submit(conn, slot, body, headers, path, self.max_body_bytes)
        return True

    def _infer(
        self,
        conn: HttpConnection,
        slot: _Slot,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
    ) -> None:
        app = self.app
        app.check_can_infer()
        runner = app.model
        start_ns = time.perf_counter_ns()
        if encoding and encoding != b"identity":
            body = self._decompress(body, encoding)
        length: int | None = None
        if header_length is not None:
            try:
                length = int(header_length)
            except ValueError:
                raise BadRequest(
                    f"Inference-Header-Content-Length is not a number: {header_length!r}"
                ) from None
        try:
            request = decode_infer_request(runner, body, length)
        except ServingError as exc:
            app.stats.record_failure(time.perf_counter_ns() - start_ns, "REJECTED")
            raise exc from None

        def done(outcome: list[Array] | BaseException) -> None:
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                payload, json_length = encode_infer_response(runner, request, outcome)
            except ServingError as exc:
                app.stats.record_failure(time.perf_counter_ns() - start_ns, "BACKEND")
                conn._reply_error(slot, exc)
                return
            except Exception as exc:
                self.log_exception(exc)
                app.stats.record_failure(time.perf_counter_ns() - start_ns, "OTHER")
                conn._reply_error(slot, ServingError(f"internal error: {type(exc).__name__}"))
                return
            app.stats.record_success(time.perf_counter_ns() - start_ns)
            if json_length is None:
                conn.reply(slot, 200, payload)
            else:
                conn.reply(slot, 200, payload, content_type=_OCTETS, header_length=json_length)

        try:
            app.batcher.submit_callback(request.feeds, done)
        except ServingError as exc:
            app.stats.record_failure(time.perf_counter_ns() - start_ns, "REJECTED")
            raise exc from None

    def _decompress(self, body: bytes, encoding: bytes) -> bytes:
        if encoding == b"gzip":
            wbits = 16 + zlib.MAX_WBITS
        elif encoding == b"deflate":
            wbits = zlib.MAX_WBITS
        else:
            raise BadRequest(f"unsupported Content-Encoding {encoding.decode('latin-1')!r}")
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error as exc:
            raise BadRequest(f"cannot decompress the body: {exc}") from None
        if len(data) > self.max_body_bytes or inflater.unconsumed_tail:
            raise PayloadTooLarge(
                f"decompressed body is over the limit of {self.max_body_bytes} bytes"
            )
        return data


_ASYNC_HEADERS = frozenset({b"prefer", b"content-type", b"modelport-callback-url"})


class _MethodNotAllowed(ServingError):
    status = 405


class _ConnectionError(ServingError):
    """A request the connection cannot go on after (malformed, over a limit, too slow)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
