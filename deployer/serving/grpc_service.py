"""The V2 gRPC service logic, kept apart from the grpc.aio transport in grpc_server.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deployer import __version__
from deployer.serving.app import SERVER_NAME, ServingApp
from deployer.serving.datatypes import V2_TO_NUMPY, tensor_from_json, tensor_from_raw, tensor_to_raw
from deployer.serving.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServingError,
    Unauthorized,
    Unavailable,
)
from deployer.serving.model import Array, ModelRunner
from deployer.serving.proto import load

SERVICE = "inference.GRPCInferenceService"

# gRPC status codes (the numbers are fixed by the gRPC protocol).
OK = 0
CANCELLED = 1
INVALID_ARGUMENT = 3
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_CODES: dict[type[ServingError], int] = {
    BadRequest: INVALID_ARGUMENT,
    NotFound: NOT_FOUND,
    Unavailable: UNAVAILABLE,
    PayloadTooLarge: RESOURCE_EXHAUSTED,
    Overloaded: RESOURCE_EXHAUSTED,
    RateLimited: RESOURCE_EXHAUSTED,
    Unauthorized: UNAUTHENTICATED,
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


def status_code(exc: ServingError) -> int:
    """The gRPC status code for a ServingError."""
    return _CODES.get(type(exc), INTERNAL)


class InferCall:
    """A ModelInfer call between submission to the batcher and its answer."""

    __slots__ = ("outcome", "pending", "request", "runner", "start_ns", "wanted")

    def __init__(self, request: Any, runner: ModelRunner, wanted: list[int], start_ns: int) -> None:
        self.request = request
        self.runner = runner
        self.wanted = wanted
        self.start_ns = start_ns
        self.outcome: list[Array] | BaseException | None = None
        self.pending: Any = None  # the batcher's handle, to drop the work if the caller goes


class GrpcService:
    """Answers the six V2 RPCs for the ServingApp; transports call it."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.pb: Any = load()
        pb = self.pb
        # name -> (request message class, response message class, handler); ModelInfer is
        # asynchronous and handled by infer_begin/infer_finish instead.
        self.unary: dict[str, tuple[Any, Any, Callable[[Any], Any]]] = {
            "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, self.model_ready),
            "ServerMetadata": (
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
                self.server_metadata,
            ),
            "ModelMetadata": (
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
                self.model_metadata,
            ),
        }

    def server_live(self, request: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    def server_ready(self, request: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self.app.readiness_error() is None)

    def model_ready(self, request: Any) -> Any:
        self.app.check_model(request.name, request.version)
        return self.pb.ModelReadyResponse(ready=self.app.readiness_error() is None)

    def server_metadata(self, request: Any) -> Any:
        meta = self.app.server_metadata()
        return self.pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=meta["extensions"]
        )

    def model_metadata(self, request: Any) -> Any:
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

    def infer_begin(self, request: Any, on_done: Callable[[InferCall], None]) -> InferCall:
        """Validate, decode and queue a ModelInferRequest; `on_done(call)` runs on the loop
        once the outcome is in. Raises ServingError for a request that cannot be queued."""
        app = self.app
        app.check_model(request.model_name, request.model_version)
        app.check_can_infer()
        runner = app.model
        start_ns = time.perf_counter_ns()
        try:
            feeds = decode_inputs(runner, request)
            call = InferCall(request, runner, requested_outputs(runner, request), start_ns)

            def done(outcome: list[Array] | BaseException) -> None:
                call.outcome = outcome
                on_done(call)

            call.pending = app.batcher.submit_callback(feeds, done)
        except ServingError:
            app.stats.record_failure(time.perf_counter_ns() - start_ns, "REJECTED")
            raise
        return call

    def infer_finish(self, call: InferCall) -> Any:
        """Build the ModelInferResponse from the call's outcome; raises its ServingError."""
        app = self.app
        outcome = call.outcome
        if isinstance(outcome, BaseException) or outcome is None:
            app.stats.record_failure(time.perf_counter_ns() - call.start_ns, "BACKEND")
            if isinstance(outcome, ServingError):
                raise outcome
            raise ServingError(f"inference failed: {outcome}")
        runner = call.runner
        response = self.pb.ModelInferResponse(
            model_name=runner.name, model_version=runner.version, id=call.request.id
        )
        raw = response.raw_output_contents
        add = response.outputs.add
        for index in call.wanted:
            spec = runner.outputs[index]
            array = outcome[index]
            add(name=spec.name, datatype=spec.datatype, shape=array.shape)
            raw.append(tensor_to_raw(array, spec.datatype))
        app.stats.record_success(time.perf_counter_ns() - call.start_ns)
        return response


def decode_inputs(runner: ModelRunner, request: Any) -> dict[str, Array]:
    """Feeds from a ModelInferRequest's inputs (raw_input_contents or typed contents)."""
    raw = request.raw_input_contents
    tensors = request.inputs
    if not tensors:
        raise BadRequest("request has no inputs")
    if raw and len(raw) != len(tensors):
        raise BadRequest(f"raw_input_contents holds {len(raw)} buffers for {len(tensors)} inputs")
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
        feeds[name] = tensor_from_json(list(getattr(tensor.contents, field)), datatype, shape)
    runner.check_complete(feeds)
    if len(feeds) > 1:
        feeds = {spec.name: feeds[spec.name] for spec in runner.inputs}
    return feeds


def requested_outputs(runner: ModelRunner, request: Any) -> list[int]:
    """Indexes of the outputs to return (all when none are named)."""
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
