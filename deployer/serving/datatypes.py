"""V2 datatypes and their numpy, ONNX and wire encodings."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from deployer.serving.errors import BadRequest

# V2 datatype -> numpy dtype (little-endian, as the wire format requires).
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

# onnxruntime's type strings ("tensor(float)") -> V2 datatype.
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# V2 datatype -> Triton model-config type name (for the configuration extension).
V2_TO_TRITON_CONFIG: dict[str, str] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}

_NUMPY_KIND_TO_V2: dict[str, str] = {
    str(dtype): name for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"
}

_LENGTH = struct.Struct("<I")


def v2_datatype_of(array: np.ndarray[Any, Any]) -> str:
    """Return the V2 datatype name for a numpy array produced by onnxruntime."""
    if array.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    name = _NUMPY_KIND_TO_V2.get(str(array.dtype.newbyteorder("<")))
    if name is None:
        raise ValueError(f"no V2 datatype for numpy dtype {array.dtype}")
    return name


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    """Number of elements of a tensor with this shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def serialize_bytes_tensor(array: np.ndarray[Any, Any]) -> bytes:
    """Encode a BYTES tensor as the wire format: each element is a 4-byte LE length + bytes."""
    parts: list[bytes] = []
    pack = _LENGTH.pack
    for item in array.reshape(-1):
        raw = _as_bytes(item)
        parts.append(pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes_tensor(raw: bytes | memoryview, count: int) -> list[bytes]:
    """Decode `count` length-prefixed BYTES elements; the buffer must hold exactly those."""
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    size = len(view)
    unpack = _LENGTH.unpack_from
    while offset < size:
        if offset + 4 > size:
            raise BadRequest("BYTES tensor data ends inside an element length prefix")
        (length,) = unpack(view, offset)
        offset += 4
        if offset + length > size:
            raise BadRequest("BYTES tensor element runs past the end of its data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise BadRequest(f"BYTES tensor holds {len(items)} elements, its shape needs {count}")
    return items


def tensor_from_raw(
    raw: bytes | memoryview, datatype: str, shape: list[int]
) -> np.ndarray[Any, Any]:
    """Build a numpy array from raw little-endian tensor bytes (binary extension or gRPC raw)."""
    count = element_count(shape)
    if datatype == "BYTES":
        items = deserialize_bytes_tensor(raw, count)
        array = np.empty(count, dtype=np.object_)
        array[:] = items
        return array.reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"raw data holds {len(raw)} bytes, shape {shape} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_to_raw(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    """Raw little-endian bytes of a tensor, BYTES length-prefixed."""
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    dtype = V2_TO_NUMPY[datatype]
    if array.dtype != dtype:
        array = array.astype(dtype)
    return np.ascontiguousarray(array).tobytes()


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def tensor_from_json(data: Any, datatype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    """Build a numpy array from a JSON `data` value (flat or nested) of the given datatype."""
    count = element_count(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise BadRequest(f"data holds {len(flat)} elements, shape {shape} needs {count}")
        array = np.empty(count, dtype=np.object_)
        for index, item in enumerate(flat):
            if isinstance(item, str):
                array[index] = item.encode("utf-8")
            elif isinstance(item, bytes):
                array[index] = item
            elif isinstance(item, (bool, int, float)):
                array[index] = str(item).encode("utf-8")
            else:
                raise BadRequest("BYTES data elements must be strings")
        return array.reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"data is not a valid {datatype} array: {exc}") from None
    if array.size != count:
        raise BadRequest(f"data holds {array.size} elements, shape {shape} needs {count}")
    return array.reshape(shape)


def tensor_to_json(array: np.ndarray[Any, Any], datatype: str) -> list[Any]:
    """Flat JSON-ready list of a tensor's elements."""
    if datatype == "BYTES":
        return [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    result: list[Any] = array.reshape(-1).tolist()
    return result
