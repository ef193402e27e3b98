"""Model input/output signatures in the Open Inference Protocol's terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployer.serving.datatypes import ORT_TO_V2, V2_TO_NUMPY

# One table of datatypes for the whole engine: the serving runtime's.
__all__ = ["ORT_TO_V2", "V2_TO_NUMPY", "Signature", "TensorSpec", "ort_dims"]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: V2 datatype and shape, with -1 for a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        if self.datatype not in V2_TO_NUMPY:
            raise ValueError(f"{self.name}: datatype {self.datatype} has no numpy equivalent")
        return np.dtype(V2_TO_NUMPY[self.datatype])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            datatype=str(data["datatype"]),
            shape=tuple(int(d) for d in data["shape"]),
        )


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs."""

    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)

    @property
    def dynamic_batch(self) -> bool:
        """Whether every input and output has a free first dimension."""
        specs = self.inputs + self.outputs
        return bool(specs) and all(s.shape and s.shape[0] == -1 for s in specs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(d) for d in data.get("inputs", [])),
            outputs=tuple(TensorSpec.from_dict(d) for d in data.get("outputs", [])),
        )


def ort_dims(shape: list[int | str | None]) -> tuple[int, ...]:
    """onnxruntime's shape (ints, symbolic names or None) with -1 for anything not fixed."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def session_signature(session: Any) -> Signature:
    """An onnxruntime session's inputs and outputs as a ``Signature``.

    Raises ``InvalidModel`` for an input or output that is not a tensor (a sequence or
    map), which the inference protocol cannot carry.
    """
    return Signature(
        inputs=tuple(_session_spec(node) for node in session.get_inputs()),
        outputs=tuple(_session_spec(node) for node in session.get_outputs()),
    )


def _session_spec(node: Any) -> TensorSpec:
    from deployer.errors import InvalidModel

    datatype = ORT_TO_V2.get(node.type)
    if datatype is None:
        raise InvalidModel(
            f"{node.name} has type {node.type}, which cannot be served over the inference "
            "protocol (only tensors of numbers, booleans and strings can).",
            code="unsupported_type",
        )
    return TensorSpec(name=node.name, datatype=datatype, shape=ort_dims(list(node.shape or [])))
