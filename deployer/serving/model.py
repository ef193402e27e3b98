"""The one ONNX model a server holds: session, tensor metadata, validation, warm-up."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from deployer.serving.batch_axes import BatchAxes, Dims, find_batch_axes
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
    # The graph's symbolic dimension names ("" where a dimension has none).
    dim_names: tuple[str, ...] = ()

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
    dims = list(node.shape or ())
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in dims)
    names = tuple(dim if isinstance(dim, str) else "" for dim in dims)
    return TensorSpec(name=node.name, datatype=datatype, shape=shape, dim_names=names)


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
        found = find_batch_axes(
            [Dims(s.name, s.shape, s.dim_names) for s in self.inputs],
            [Dims(s.name, s.shape, s.dim_names) for s in self.outputs],
        )
        # Until warm-up confirms them, these are a guess from the graph's shapes.
        self.batch_axes: BatchAxes | None = found if isinstance(found, BatchAxes) else None
        self.unbatched_reason = "" if isinstance(found, BatchAxes) else found
        if not self.max_batch_size:
            self.unbatched_reason = "max_batch_size is 0 or 1"
        self.batchable = self.max_batch_size > 0 and self.batch_axes is not None
        self.input_axes: dict[str, int] = dict(self.batch_axes.inputs) if self.batch_axes else {}
        self.output_axes: tuple[int, ...] = self.batch_axes.outputs if self.batch_axes else ()

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
        """Synthetic inputs (batch axis `batch`, other free dims 1), when no sample is given."""
        rng = np.random.default_rng(0)
        feeds: dict[str, Array] = {}
        for spec in self.inputs:
            axis = self.input_axes.get(spec.name, 0)
            shape = [
                dim if dim >= 0 else (batch if index == axis else 1)
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

    def conform_sample(self, arrays: dict[str, Array]) -> dict[str, Array]:
        """A recorded sample as feeds of the model; ValueError naming what does not fit."""
        feeds: dict[str, Array] = {}
        for spec in self.inputs:
            if spec.name not in arrays:
                raise ValueError(
                    f"the warm-up sample has no input {spec.name!r} "
                    f"(it has {', '.join(arrays) or 'none'})"
                )
            array = np.asarray(arrays[spec.name])
            shape = list(array.shape)
            if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
            ):
                raise ValueError(
                    f"the warm-up sample's {spec.name!r} has shape {shape}, "
                    f"the model expects {list(spec.shape)}"
                )
            if spec.datatype == "BYTES":
                items = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]
                flat = np.empty(len(items), dtype=np.object_)
                flat[:] = items
                feeds[spec.name] = flat.reshape(array.shape)
            else:
                feeds[spec.name] = array.astype(V2_TO_NUMPY[spec.datatype])
        return feeds

    def warmup(self, feeds: dict[str, Array] | None = None) -> None:
        """Run the model once (on `feeds`, else synthetic inputs), then check batchability."""
        sample = feeds if feeds is not None else self.sample_feeds(1, random=False)
        self.run(sample)
        if not self.batchable:
            self._log_unbatched(self.unbatched_reason)
            return
        try:
            reason = self._rows_independent(sample, synthetic=feeds is None)
        except Exception as exc:  # inputs this model rejects when paired: do not guess
            reason = f"two rows together failed to run ({_first_line(exc)})"
        if reason:
            self.batchable = False
            self.unbatched_reason = reason
            self._log_unbatched(reason)

    def _log_unbatched(self, reason: str) -> None:
        if self.max_batch_size:
            log.warning(
                "dynamic batching disabled: %s",
                reason,
                extra={"event": "batching_disabled", "reason": reason},
            )

    def _pair(self, sample: dict[str, Array], synthetic: bool) -> tuple[dict[str, Array], ...]:
        """Two single rows from the sample: its first two, or its first and a shuffled copy."""
        if synthetic:
            sample = self.sample_feeds(1, random=True)
        rng = np.random.default_rng(1)
        rows: list[dict[str, Array]] = [{}, {}]
        for name, array in sample.items():
            axis = self.input_axes[name]
            first = np.take(array, [0], axis=axis)
            if array.shape[axis] >= 2:
                second = np.take(array, [1], axis=axis)
            elif array.dtype.kind in "fc":
                noise = rng.standard_normal(first.shape).astype(first.dtype)
                second = (first + noise * (np.abs(first).mean() + 1)).astype(first.dtype)
            else:
                second = rng.permutation(first.ravel()).reshape(first.shape)
            rows[0][name], rows[1][name] = first, second
        return rows[0], rows[1]

    def _rows_independent(self, sample: dict[str, Array], *, synthetic: bool) -> str:
        """Empty when two rows run together give what each gives alone, else why not."""
        first, second = self._pair(sample, synthetic)
        pair = {
            name: np.concatenate([first[name], second[name]], axis=self.input_axes[name])
            for name in first
        }
        together, _ = self.run(pair)
        for index, row in enumerate((first, second)):
            alone, _ = self.run(row)
            for name, axis, joint, solo in zip(
                self.output_names, self.output_axes, together, alone, strict=True
            ):
                if joint.ndim <= axis or joint.shape[axis] != 2 or solo.shape[axis] != 1:
                    return (
                        f"output {name!r} does not grow with the batch axis of the inputs "
                        f"(shape {list(joint.shape)} for two rows, axis {axis})"
                    )
                if not _rows_match(np.take(joint, [index], axis=axis), solo):
                    return f"output {name!r} is not computed row by row along axis {axis}"
        return ""

    def triton_config(self, max_queue_delay_us: int, instances: int) -> dict[str, Any]:
        """The model configuration extension's answer, in Triton's JSON form."""
        from deployer.serving.datatypes import V2_TO_TRITON_CONFIG

        # Triton's configuration can only say "the first axis is the batch".
        batched = self.batchable and not any(self.input_axes.values()) and not any(self.output_axes)

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


def read_warmup_sample(path: Path) -> dict[str, Array]:
    """The inputs of a recorded sample: a known answer's ``input:NAME`` arrays, or plain
    ``NAME`` arrays; never unpickles."""
    arrays: dict[str, Array] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            kind, sep, name = key.partition(":")
            if not sep:
                arrays[key] = archive[key]
            elif kind == "input":
                arrays[name] = archive[key]
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _rows_match(left: Array, right: Array) -> bool:
    if left.shape != right.shape:
        return False
    if left.dtype == np.float16:  # half precision rounds differently per kernel and batch
        return bool(np.allclose(left, right, rtol=1e-2, atol=1e-3, equal_nan=True))
    if left.dtype.kind in "fc":
        return bool(np.allclose(left, right, rtol=1e-3, atol=1e-4, equal_nan=True))
    return bool(np.array_equal(left, right))
