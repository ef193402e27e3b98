"""The gRPC front end: `inference.GRPCInferenceService` on grpc.aio, sharing the REST engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from deployer import __version__
from deployer.serving.app import SERVER_NAME, ServingApp
from deployer.serving.datatypes import V2_TO_NUMPY, tensor_from_json, tensor_from_raw, tensor_to_raw
from deployer.serving.errors import BadRequest, NotFound, PayloadTooLarge, ServingError, Unavailable
from deployer.serving.model import Array, ModelRunner
from deployer.serving.proto import load

log = logging.getLogger("deployer.serving")

SERVICE = "inference.GRPCInferenceService"

_STATUS = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Which InferTensorContents field carries each datatype (FP16 has none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _grpc_status(exc: ServingError) -> grpc.StatusCode:
    return _STATUS.get(type(exc), grpc.StatusCode.INTERNAL)


class GrpcServer:
    """Serves the V2 gRPC API for the ServingApp."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.pb: Any = load()
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
        pb = self.pb
        methods: dict[str, tuple[Handler, Any, Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (
                self.server_metadata,
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
            ),
            "ModelMetadata": (
                self.model_metadata,
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
            ),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, handler),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (handler, request, response) in methods.items()
        }
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

    def _wrap(self, name: str, handler: Handler) -> Handler:
        app = self.app
        path = f"/{SERVICE}/{name}"

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            app.inflight += 1
            status = grpc.StatusCode.OK
            error: str | None = None
            try:
                return await handler(request, context)
            except ServingError as exc:
                status = _grpc_status(exc)
                error = exc.message
            except Exception as exc:
                log.error(
                    "unhandled error in %s", name, exc_info=exc, extra={"event": "internal_error"}
                )
                status = grpc.StatusCode.INTERNAL
                error = f"internal error: {type(exc).__name__}"
            finally:
                app.inflight -= 1
                if app.access_log.enabled:
                    peer = context.peer() or ""
                    app.access_log.record(
                        protocol="grpc",
                        method="POST",
                        path=path,
                        status=status.value[0],
                        duration_s=time.perf_counter() - start,
                        bytes_in=request.ByteSize() if name == "ModelInfer" else 0,
                        bytes_out=0,
                        peer=peer,
                        error=error,
                    )
            await context.abort(status, error or "")
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return call

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb.ServerReadyResponse(ready=self.app.readiness_error() is None)

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.app.check_model(request.name, request.version)
        return self.pb.ModelReadyResponse(ready=self.app.readiness_error() is None)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self.app.server_metadata()
        return self.pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=meta["extensions"]
        )

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.app.check_model(request.name, request.version)
        runner = self.app.model
        tensor = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=runner.name,
            versions=[runner.version],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in runner.inputs],
            outputs=[
                tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in runner.outputs
            ],
        )

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        app = self.app
        app.check_model(request.model_name, request.model_version)
        app.check_can_infer()
        runner = app.model
        start_ns = time.perf_counter_ns()
        try:
            feeds = self._decode_inputs(runner, request)
            wanted = self._requested_outputs(runner, request)
            future = app.batcher.submit(feeds)
        except ServingError:
            app.stats.record_failure(time.perf_counter_ns() - start_ns, "REJECTED")
            raise
        try:
            results = await future
        except ServingError:
            app.stats.record_failure(time.perf_counter_ns() - start_ns, "BACKEND")
            raise
        response = self.pb.ModelInferResponse(
            model_name=runner.name, model_version=runner.version, id=request.id
        )
        raw = response.raw_output_contents
        for index in wanted:
            spec = runner.outputs[index]
            array = results[index]
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
            raw.append(tensor_to_raw(array, spec.datatype))
        app.stats.record_success(time.perf_counter_ns() - start_ns)
        return response

    @staticmethod
    def _decode_inputs(runner: ModelRunner, request: Any) -> dict[str, Array]:
        raw = request.raw_input_contents
        tensors = request.inputs
        if not tensors:
            raise BadRequest("request has no inputs")
        if raw and len(raw) != len(tensors):
            raise BadRequest(
                f"raw_input_contents holds {len(raw)} buffers for {len(tensors)} inputs"
            )
        feeds: dict[str, Array] = {}
        for index, tensor in enumerate(tensors):
            name = tensor.name
            if name in feeds:
                raise BadRequest(f"input {name!r} appears twice")
            datatype = tensor.datatype
            if datatype not in V2_TO_NUMPY:
                raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}")
            shape = list(tensor.shape)
            runner.validate(name, datatype, shape)
            if raw:
                feeds[name] = tensor_from_raw(raw[index], datatype, shape)
                continue
            field = _CONTENTS_FIELD.get(datatype)
            if field is None:
                raise BadRequest(f"input {name!r}: {datatype} data must come in raw_input_contents")
            values = list(getattr(tensor.contents, field))
            feeds[name] = tensor_from_json(values, datatype, shape)
        runner.check_complete(feeds)
        if len(feeds) > 1:
            feeds = {spec.name: feeds[spec.name] for spec in runner.inputs}
        return feeds

    @staticmethod
    def _requested_outputs(runner: ModelRunner, request: Any) -> list[int]:
        if not request.outputs:
            return list(range(len(runner.outputs)))
        wanted = []
        for output in request.outputs:
            index = runner.output_index.get(output.name)
            if index is None:
                known = ", ".join(runner.output_names)
                raise BadRequest(f"unknown output {output.name!r}; the model's outputs are {known}")
            wanted.append(index)
        return wanted
