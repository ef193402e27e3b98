"""gRPC transport on grpc.aio (`--grpc-impl aio`): the reference implementation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from deployer.serving.app import ServingApp
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
        limit = self.app.config.max_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
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
        await finished
        return self.service.infer_finish(call)  # raises the call's error, if any

    def _wrap(self, name: str, handler: Handler) -> Handler:
        app = self.app
        path = f"/{SERVICE}/{name}"

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            app.inflight += 1
            code = 0
            error: str | None = None
            try:
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
                    )
            status = next(s for s in grpc.StatusCode if s.value[0] == code)
            await context.abort(status, error or "")
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return call
