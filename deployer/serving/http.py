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
from deployer.serving.errors import BadRequest, NotFound, PayloadTooLarge, ServingError
from deployer.serving.model import Array

log = logging.getLogger("deployer.serving")

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
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
) -> bytes:
    head = [
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        % (status, _REASONS.get(status, b"Unknown"), content_type, len(body))
    ]
    if header_length is not None:
        head.append(b"inference-header-content-length: %d\r\n" % header_length)
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


def _error_body(message: str) -> bytes:
    return dumps({"error": message})


class _Slot:
    """One request on a connection, answered in the order requests arrived."""

    __slots__ = (
        "bytes_in",
        "data",
        "error",
        "keep_alive",
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
        self._expect_continue = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail_connection(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail_connection(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._body_size = 0
        self._too_large = False
        self._header_length = None
        self._encoding = None
        self._expect_continue = False

    def on_headers_complete(self) -> None:
        # curl and others wait (a second, for curl) for "100 Continue" before a large body.
        if self._expect_continue and not self._too_large and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"inference-header-content-length":
            self._header_length = value
        elif lowered == b"content-encoding":
            self._encoding = value.strip().lower()
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
    ) -> None:
        """Complete `slot` with a response and send whatever is ready, in order."""
        slot.status = status
        slot.data = _response(
            status,
            body,
            content_type=content_type,
            keep_alive=slot.keep_alive,
            header_length=header_length,
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
        if self.server.closing and not slots and transport is not None and not self.closing:
            self.closing = True
            transport.close()

    def _reply_error(self, slot: _Slot, exc: ServingError) -> None:
        slot.error = exc.message
        self.reply(slot, exc.status, _error_body(exc.message))

    def _fail_connection(self, status: int, message: str) -> None:
        if self.transport is not None:
            self.transport.write(_response(status, _error_body(message), keep_alive=False))
            self.closing = True
            self.transport.close()

    def close_if_idle(self) -> None:
        """Close the connection unless a request on it is still being answered."""
        if not self.slots and self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()


class HttpServer:
    """Routes V2 REST requests to the ServingApp."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.max_body_bytes = app.config.max_body_bytes
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
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
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def stop_accepting(self) -> None:
        """Close the listening socket and idle keep-alive connections."""
        self.closing = True
        if self._server is not None:
            self._server.close()
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
        if method == "POST" and path in self._infer_paths:  # the hot path, without parsing
            self._infer(conn, slot, body, header_length, encoding)
            return
        parts = path.strip("/").split("/")
        if not parts or parts[0] != "v2":
            raise NotFound(f"no route for {path}")
        app = self.app
        count = len(parts)
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
        if len(rest) != 1:
            raise NotFound(f"no route for {path}")
        action = rest[0]
        if action == "infer":
            self._expect(method, "POST")
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


class _MethodNotAllowed(ServingError):
    status = 405
