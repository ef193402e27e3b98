"""The gRPC listener: grpcio's asyncio server, with every limit set from ServingConfig.

grpcio (a maintained HTTP/2 and HPACK implementation) enforces the stream, metadata,
message, handshake, idle, age and connection limits itself; this module adds keys, the
mapping of errors to status codes, and dropping queued work when a call is cancelled
(reset stream, `grpc-timeout` deadline passed, client gone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from deployer.serving.app import ServingApp
from deployer.serving.config import ServingConfig
from deployer.serving.errors import ServingError
from deployer.serving.grpc_service import SERVICE, GrpcService, InferCall, status_code

log = logging.getLogger("deployer.serving")

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class GrpcServer:
    """Serves the V2 gRPC API with grpcio's asyncio server."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.service = GrpcService(app)
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        server = grpc.aio.server(options=grpc_options(self.app.config))
        service = self.service
        pb = service.pb
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, self._sync(handler)),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response, handler) in service.unary.items()
        }
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            self._wrap("ModelInfer", self._infer),
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = int(server.add_insecure_port(address))
        if bound == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls and let running ones finish within `grace_s`."""
        if self._server is not None:
            await self._server.stop(grace_s)

    @staticmethod
    def _sync(handler: Callable[[Any], Any]) -> Handler:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return handler(request)

        return call

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        finished: asyncio.Future[InferCall] = asyncio.get_running_loop().create_future()

        def on_done(done: InferCall) -> None:
            if not finished.done():  # the caller may have gone away
                finished.set_result(done)

        call = self.service.infer_begin(request, on_done)
        try:
            await finished
        except asyncio.CancelledError:
            # Reset stream or passed deadline: its queued rows must not still run (rapid reset).
            self.app.batcher.cancel(call.pending)
            raise
        return self.service.infer_finish(call)  # raises the call's error, if any

    def _wrap(self, name: str, handler: Handler) -> Handler:
        app = self.app
        path = f"/{SERVICE}/{name}"
        needs_key = name not in OPEN_METHODS

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            app.inflight += 1
            code = 0
            error: str | None = None
            key: str | None = None
            try:
                if needs_key and app.keys is not None:
                    key = app.authorize(_authorization(context))
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # The caller's grpc-timeout ran out while the call was queued: its
                    # answer can no longer be used, so no model time is spent on it.
                    code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
                    error = "the call's deadline (grpc-timeout) passed before it could start"
                else:
                    return await handler(request, context)
            except ServingError as exc:
                code = status_code(exc)
                error = exc.message
            except Exception as exc:
                log.error(
                    "unhandled error in %s", name, exc_info=exc, extra={"event": "internal_error"}
                )
                code = grpc.StatusCode.INTERNAL.value[0]
                error = f"internal error: {type(exc).__name__}"
            finally:
                app.inflight -= 1
                if app.access_log.enabled:
                    app.access_log.record(
                        protocol="grpc",
                        method="POST",
                        path=path,
                        status=code,
                        duration_s=time.perf_counter() - start,
                        bytes_in=request.ByteSize() if name == "ModelInfer" else 0,
                        bytes_out=0,
                        peer=context.peer() or "",
                        error=error,
                        key=key,
                    )
            status = next(s for s in grpc.StatusCode if s.value[0] == code)
            await context.abort(status, error or "")
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return call


# Health RPCs stay open when keys are required (like REST's /v2/health/*).
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def grpc_options(config: ServingConfig) -> list[tuple[str, Any]]:
    """grpcio channel arguments for the listener's limits (README "Limits")."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", config.grpc_max_concurrent_streams),
        # Soft and hard limits on the header list, also within a single HEADERS frame.
        ("grpc.max_metadata_size", config.grpc_max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", config.grpc_max_metadata_bytes),
        ("grpc.server_handshake_timeout_ms", int(config.grpc_handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(config.grpc_idle_timeout_s * 1000)),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
    ]
    if config.grpc_max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(config.grpc_max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(config.drain_timeout_s * 1000)))
    return options
