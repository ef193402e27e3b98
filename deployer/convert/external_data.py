"""Every tensor of an ONNX model, wherever it hides, and the rule for their external data.

A tensor can keep its bytes in a file next to the model (``data_location=EXTERNAL``).
Such tensors are not only graph initializers: a ``Constant`` node carries one in
its ``value`` (or ``sparse_value``) attribute, any node can carry them in TENSOR or
TENSORS attributes, the subgraphs of ``If``, ``Loop`` and ``Scan`` have their own
initializers and nodes, and so do the model's local functions. A check that
reads only ``graph.initializer`` lets a model name ``/etc/passwd`` (or
``../../secret``) from a ``Constant`` and return its bytes as an output.

Validation, conversion and the model-image build all call ``external_data_check``,
so there is one list of hiding places and one rule. It lives in ``deployer.convert``
because the converter image carries that package.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.errors import InvalidModel

# AttributeProto.AttributeType values (onnx.AttributeProto), kept as numbers so this
# module imports without onnx (the portal imports deployer without it).
_TENSOR, _GRAPH, _SPARSE_TENSOR = 4, 5, 11
_TENSORS, _GRAPHS, _SPARSE_TENSORS = 9, 10, 12
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class ExternalTensor:
    """A tensor whose data lives in a file: where in the model it is, and the file it names."""

    where: str
    name: str
    location: str


def model_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every TensorProto of the model as ``(where, tensor)``, nested graphs and functions too."""
    yield from _graph_tensors(model.graph, "graph")
    for function in model.functions:
        yield from _nodes_tensors(function.node, f"function {function.domain}:{function.name}")
    for index, info in enumerate(model.training_info):
        yield from _graph_tensors(info.initialization, f"training_info[{index}].initialization")
        yield from _graph_tensors(info.algorithm, f"training_info[{index}].algorithm")


def _graph_tensors(graph: Any, where: str) -> Iterator[tuple[str, Any]]:
    for tensor in graph.initializer:
        yield f"{where} initializer", tensor
    for sparse in graph.sparse_initializer:
        yield f"{where} sparse initializer", sparse.values
        yield f"{where} sparse initializer", sparse.indices
    yield from _nodes_tensors(graph.node, where)


def _nodes_tensors(nodes: Any, where: str) -> Iterator[tuple[str, Any]]:
    for node in nodes:
        label = f"{where} node {node.name or node.op_type!r}"
        for attribute in node.attribute:
            at = f"{label} attribute {attribute.name!r}"
            kind = attribute.type
            # A parser fills the field whatever the declared type says, so the fields
            # are read, not just the type (an attribute with the wrong type still loads).
            if kind == _TENSOR or attribute.HasField("t"):
                yield at, attribute.t
            if kind == _SPARSE_TENSOR or attribute.HasField("sparse_tensor"):
                yield at, attribute.sparse_tensor.values
                yield at, attribute.sparse_tensor.indices
            for tensor in attribute.tensors:
                yield at, tensor
            for sparse in attribute.sparse_tensors:
                yield at, sparse.values
                yield at, sparse.indices
            if kind == _GRAPH or attribute.HasField("g"):
                yield from _graph_tensors(attribute.g, f"{at} subgraph")
            for index, graph in enumerate(attribute.graphs):
                yield from _graph_tensors(graph, f"{at} subgraph[{index}]")


def external_tensors(model: Any) -> list[ExternalTensor]:
    """The model's tensors that keep their data in a file, wherever they are."""
    found = []
    for where, tensor in model_tensors(model):
        if tensor.data_location != _EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        found.append(ExternalTensor(where, tensor.name, entries.get("location", "")))
    return found


def external_data_check(model: Any, model_dir: Path, *, require_files: bool = True) -> list[str]:
    """The external data files the model names, relative to ``model_dir``, sorted.

    Raises ``InvalidModel`` for a file that is absolute, climbs out with ``..``,
    resolves (through a link) outside the folder, or (``require_files``) is missing.
    """
    root = model_dir.resolve()
    locations: set[str] = set()
    for item in external_tensors(model):
        location = item.location
        target = (root / location).resolve()
        if (
            not location
            or "\x00" in location
            or os.path.isabs(location)
            or location.startswith("\\")
            or ".." in Path(location).parts
            or ".." in location.split("\\")
            or not target.is_relative_to(root)
            or target == root
        ):
            raise InvalidModel(
                f"Tensor {item.name!r} ({item.where}) keeps its data at {location!r}, outside "
                "the model's own folder. External data files must sit next to the model "
                "(upload a .zip with both).",
                code="external_data_outside",
            )
        if require_files and not target.is_file():
            raise InvalidModel(
                f"Tensor {item.name!r} ({item.where}) keeps its data in {location!r}, which was "
                "not uploaded. Upload a .zip holding the model and its external data files.",
                code="external_data_missing",
            )
        locations.add(location)
    return sorted(locations)
