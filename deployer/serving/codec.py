"""V2 REST inference bodies: JSON tensors and the binary tensor data extension."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deployer.serving.datatypes import (
    V2_TO_NUMPY,
    tensor_from_json,
    tensor_from_raw,
    tensor_to_json,
    tensor_to_raw,
)
from deployer.serving.errors import BadRequest
from deployer.serving.model import Array, ModelRunner

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=True).encode


@dataclass(frozen=True)
class RequestedOutput:
    """An output to return: its index in the model's outputs and whether to send it binary."""

    index: int
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: feeds in the model's input order and what to return."""

    id: str | None
    feeds: dict[str, Array]
    outputs: list[RequestedOutput]


def _shape_of(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) for dim in value
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of integers")
    return value


def _binary_flag(parameters: Any, key: str, default: bool) -> bool:
    if not isinstance(parameters, dict):
        return default
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key!r} must be true or false")
    return value


def decode_infer_request(
    runner: ModelRunner, body: bytes, header_length: int | None
) -> InferRequest:
    """Decode a REST infer body; `header_length` is Inference-Header-Content-Length if sent."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length} "
                f"but the body holds {len(body)} bytes"
            )
        head = body[:header_length]
        binary = memoryview(body)[header_length:]
    else:
        head = body
        binary = memoryview(b"")
    try:
        doc = json.loads(head.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request must have a non-empty 'inputs' list")

    feeds: dict[str, Array] = {}
    offset = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise BadRequest("each entry of 'inputs' must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequest("each input needs a string 'name'")
        if name in feeds:
            raise BadRequest(f"input {name!r} appears twice")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
            raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}")
        shape = _shape_of(item.get("shape"), name)
        runner.validate(name, datatype, shape)
        parameters = item.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a whole number")
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} runs past the end of the "
                    f"binary data ({len(binary) - offset} bytes left)"
                )
            feeds[name] = tensor_from_raw(binary[offset : offset + size], datatype, shape)
            offset += size
        else:
            if "data" not in item:
                raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            feeds[name] = tensor_from_json(item["data"], datatype, shape)
    if offset != len(binary):
        raise BadRequest(
            f"the body holds {len(binary) - offset} bytes of binary data no input claims"
        )
    runner.check_complete(feeds)
    if len(feeds) > 1:
        feeds = {spec.name: feeds[spec.name] for spec in runner.inputs}

    binary_default = _binary_flag(doc.get("parameters"), "binary_data_output", False)
    requested = doc.get("outputs")
    outputs: list[RequestedOutput] = []
    if requested is None or requested == []:
        outputs = [
            RequestedOutput(index, spec.name, binary_default)
            for index, spec in enumerate(runner.outputs)
        ]
    elif isinstance(requested, list):
        for entry in requested:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise BadRequest("each entry of 'outputs' must be an object with a 'name'")
            index = runner.output_index.get(entry["name"])
            if index is None:
                known = ", ".join(runner.output_names)
                raise BadRequest(
                    f"unknown output {entry['name']!r}; the model's outputs are {known}"
                )
            binary_flag = _binary_flag(entry.get("parameters"), "binary_data", binary_default)
            outputs.append(RequestedOutput(index, entry["name"], binary_flag))
    else:
        raise BadRequest("'outputs' must be a list")

    request_id = doc.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None, feeds=feeds, outputs=outputs
    )


def encode_infer_response(
    runner: ModelRunner, request: InferRequest, results: list[Array]
) -> tuple[bytes, int | None]:
    """Encode outputs as a REST body; the int is the JSON header length when binary follows."""
    # Written piece by piece: the names are JSON-quoted once per model (RequestedOutput
    # and ModelRunner are fixed), and only the data goes through the encoder.
    parts: list[str] = [runner.response_prefix]
    blobs: list[bytes] = []
    specs = runner.outputs
    for position, wanted in enumerate(request.outputs):
        array = results[wanted.index]
        spec = specs[wanted.index]
        shape = ",".join(map(str, array.shape))
        if position:
            parts.append(",")
        parts.append(f'{{"name":{spec.quoted_name},"datatype":"{spec.datatype}","shape":[{shape}],')
        if wanted.binary:
            raw = tensor_to_raw(array, spec.datatype)
            parts.append(f'"parameters":{{"binary_data_size":{len(raw)}}}}}')
            blobs.append(raw)
        else:
            parts.append(f'"data":{_dumps(tensor_to_json(array, spec.datatype))}}}')
    parts.append("]")
    if request.id is not None:
        parts.append(f',"id":{_dumps(request.id)}')
    parts.append("}")
    header = "".join(parts).encode()
    if blobs:
        return header + b"".join(blobs), len(header)
    return header, None


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return _dumps(value).encode()
