"""The one ONNX model a server holds: session, tensor metadata, validation, warm-up."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from deployer.serving.config import ServingConfig, cpu_quota
from deployer.serving.datatypes import ORT_TO_V2, V2_TO_NUMPY, element_count
from deployer.serving.errors import BadRequest

log = logging.getLogger("deployer.serving")

Array = np.ndarray[Any, Any]

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class TensorSpec:
    """Name, V2 datatype and shape (-1 where dynamic) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @functools.cached_property
    def quoted_name(self) -> str:
        """The name as a JSON string literal."""
        return json.dumps(self.name)

    def as_metadata(self) -> dict[str, Any]:
        """The V2 metadata form of this tensor."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec_of(node: Any) -> TensorSpec:
    datatype = ORT_TO_V2.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor {node.name!r} has type {node.type}, which V2 cannot carry")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape or ())
    return TensorSpec(name=node.name, datatype=datatype, shape=shape)


def session_options(config: ServingConfig) -> ort.SessionOptions:
    """onnxruntime session options from the serving settings."""
    options = ort.SessionOptions()
    intra = config.intra_op_threads or cpu_quota()
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = config.inter_op_threads
    spin = "1" if config.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.graph_optimization_level = _OPT_LEVELS[config.graph_optimization_level]
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if config.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.log_severity_level = 3
    return options


class ModelRunner:
    """Holds the onnxruntime session and knows the model's tensors and batching ability."""

    def __init__(self, config: ServingConfig) -> None:
        self.name = config.model_name
        self.version = config.model_version
        self.device = config.device
        self.gpu_problem: str | None = None
        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if config.device == "gpu":
            if CUDA_PROVIDER in available:
                providers = [
                    (CUDA_PROVIDER, {"device_id": str(config.gpu_device_id)}),
                    "CPUExecutionProvider",
                ]
            else:
                self.gpu_problem = (
                    "GPU requested but onnxruntime has no CUDAExecutionProvider "
                    f"(available: {', '.join(available)}); install onnxruntime-gpu"
                )
        self.session = ort.InferenceSession(
            str(config.model), sess_options=session_options(config), providers=providers
        )
        self.providers: list[str] = list(self.session.get_providers())
        if (
            config.device == "gpu"
            and self.gpu_problem is None
            and CUDA_PROVIDER not in self.providers
        ):
            self.gpu_problem = (
                "GPU requested but the CUDA execution provider is not active "
                f"(active: {', '.join(self.providers)}); check the driver and CUDA libraries"
            )
        self.inputs = [_spec_of(node) for node in self.session.get_inputs()]
        self.outputs = [_spec_of(node) for node in self.session.get_outputs()]
        self.input_by_name = {spec.name: spec for spec in self.inputs}
        self.output_index = {spec.name: index for index, spec in enumerate(self.outputs)}
        self.output_names = [spec.name for spec in self.outputs]
        # The start of every REST infer answer: {"model_name":..,"model_version":..,"outputs":[
        self.response_prefix = (
            f'{{"model_name":{json.dumps(self.name)},'
            f'"model_version":{json.dumps(self.version)},"outputs":['
        )
        self._string_inputs = {spec.name for spec in self.inputs if spec.datatype == "BYTES"}
        self.max_batch_size = config.max_batch_size if config.max_batch_size > 1 else 0
        self.batchable = self.max_batch_size > 0 and self._has_batch_axis()

    def _has_batch_axis(self) -> bool:
        tensors = self.inputs + self.outputs
        return all(spec.shape and spec.shape[0] == -1 for spec in tensors)

    def validate(self, name: str, datatype: str, shape: list[int]) -> TensorSpec:
        """Check one request input against the model; return its spec or raise BadRequest."""
        spec = self.input_by_name.get(name)
        if spec is None:
            known = ", ".join(self.input_by_name)
            raise BadRequest(f"unexpected input {name!r}; the model's inputs are {known}")
        if datatype != spec.datatype:
            raise BadRequest(
                f"input {name!r} has datatype {datatype}, the model expects {spec.datatype}"
            )
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise BadRequest(
                f"input {name!r} has shape {shape}, the model expects {list(spec.shape)}"
            )
        if any(dim < 0 for dim in shape):
            raise BadRequest(f"input {name!r} has a negative dimension in shape {shape}")
        return spec

    def check_complete(self, names: set[str] | dict[str, Any]) -> None:
        """Raise BadRequest unless the request carries every model input."""
        missing = [spec.name for spec in self.inputs if spec.name not in names]
        if missing:
            raise BadRequest(f"missing input(s): {', '.join(missing)}")

    def run(self, feeds: dict[str, Array]) -> tuple[list[Array], int]:
        """Run the model on validated feeds; returns all outputs and the compute time in ns."""
        if self._string_inputs:
            feeds = dict(feeds)
            for name in self._string_inputs:
                feeds[name] = np.array(
                    [
                        item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item
                        for item in feeds[name].reshape(-1)
                    ],
                    dtype=np.object_,
                ).reshape(feeds[name].shape)
        start = time.perf_counter_ns()
        outputs: list[Array] = self.session.run(self.output_names, feeds)
        return outputs, time.perf_counter_ns() - start

    def sample_feeds(self, batch: int, *, random: bool) -> dict[str, Array]:
        """Inputs of the model's shape (dynamic dims as `batch` then 1) for warm-up."""
        rng = np.random.default_rng(0)
        feeds: dict[str, Array] = {}
        for spec in self.inputs:
            shape = [
                dim if dim >= 0 else (batch if index == 0 else 1)
                for index, dim in enumerate(spec.shape)
            ]
            if spec.datatype == "BYTES":
                array = np.empty(element_count(shape), dtype=np.object_)
                array[:] = [b"warmup"] * array.size
                feeds[spec.name] = array.reshape(shape)
            elif random and spec.datatype in ("FP16", "FP32", "FP64"):
                feeds[spec.name] = rng.standard_normal(shape).astype(V2_TO_NUMPY[spec.datatype])
            else:
                feeds[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
        return feeds

    def warmup(self, feeds: dict[str, Array] | None = None) -> None:
        """Run the model once (on `feeds`, else synthetic inputs), then check batchability."""
        self.run(feeds if feeds is not None else self.sample_feeds(1, random=False))
        if not self.batchable:
            return
        try:
            independent = self._rows_independent()
        except Exception as exc:  # synthetic inputs this model rejects: do not guess
            log.warning(
                "dynamic batching disabled: could not check rows on synthetic inputs: %s",
                exc,
                extra={"event": "batching_disabled"},
            )
            self.batchable = False
            return
        if not independent:
            self.batchable = False

    def _rows_independent(self) -> bool:
        """Whether two rows run together give what each gives alone."""
        pair = self.sample_feeds(2, random=True)
        together, _ = self.run(pair)
        for row in range(2):
            single = {name: value[row : row + 1] for name, value in pair.items()}
            alone, _ = self.run(single)
            for name, joint, solo in zip(self.output_names, together, alone, strict=True):
                if joint.shape[:1] != (2,) or not _rows_match(joint[row : row + 1], solo):
                    log.warning(
                        "dynamic batching disabled: output %r is not computed row by row",
                        name,
                        extra={"event": "batching_disabled", "output": name},
                    )
                    return False
        return True

    def triton_config(self, max_queue_delay_us: int, instances: int) -> dict[str, Any]:
        """The model configuration extension's answer, in Triton's JSON form."""
        from deployer.serving.datatypes import V2_TO_TRITON_CONFIG

        batched = self.batchable

        def dims(spec: TensorSpec) -> list[int]:
            return list(spec.shape[1:] if batched else spec.shape)

        config: dict[str, Any] = {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [self.version]}},
            "max_batch_size": self.max_batch_size if batched else 0,
            "input": [
                {"name": s.name, "data_type": V2_TO_TRITON_CONFIG[s.datatype], "dims": dims(s)}
                for s in self.inputs
            ],
            "output": [
                {"name": s.name, "data_type": V2_TO_TRITON_CONFIG[s.datatype], "dims": dims(s)}
                for s in self.outputs
            ],
            "instance_group": [
                {
                    "name": self.name,
                    "kind": "KIND_GPU" if self.device == "gpu" else "KIND_CPU",
                    "count": instances,
                }
            ],
            "parameters": {"execution_providers": {"string_value": ",".join(self.providers)}},
        }
        if batched:
            config["dynamic_batching"] = {
                "preferred_batch_size": [self.max_batch_size],
                "max_queue_delay_microseconds": max_queue_delay_us,
            }
        return config


def _rows_match(left: Array, right: Array) -> bool:
    if left.shape != right.shape:
        return False
    if left.dtype.kind in "fc":
        return bool(np.allclose(left, right, rtol=1e-3, atol=1e-4, equal_nan=True))
    return bool(np.array_equal(left, right))
