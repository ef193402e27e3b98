"""Sample inputs: read the user's (.npy, .npz, JSON), or generate them from a signature.

Known answers are kept as ``.npz`` files without pickled objects: string tensors
are stored as fixed-width unicode arrays, so loading one never runs code.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from deployer.errors import InvalidSample
from deployer.signature import Signature, TensorSpec

Arrays = dict[str, np.ndarray[Any, Any]]
MAX_SAMPLE_BYTES = 64 * 1024 * 1024


# Sizes tried for free dimensions other than the batch axis, most realistic first: a
# sequence or image side of 1 breaks reflect padding, strided heads and window functions.
FREE_DIM_SIZES = (16, 32, 64, 128, 8, 256, 512, 1024, 1)
BATCH_SIZES = (2, 1)
# A generated input larger than this is not tried (64 MB of float32).
MAX_GENERATED_ELEMENTS = 16 * 1024 * 1024


def generate_sample(
    signature: Signature,
    *,
    batch: int = 2,
    seed: int = 0,
    size: int = 1,
    batch_axes: dict[str, int] | None = None,
) -> Arrays:
    """Inputs that fit the signature: a free batch axis becomes ``batch``, other free
    dimensions ``size``. ``batch_axes`` names each input's batch axis (default: the first)."""
    rng = np.random.default_rng(seed)
    arrays: Arrays = {}
    for spec in signature.inputs:
        axis = (batch_axes or {}).get(spec.name, 0)
        shape = generated_shape(spec, batch=batch, size=size, axis=axis)
        arrays[spec.name] = _random_tensor(spec, shape, rng)
    return arrays


def generated_shape(spec: TensorSpec, *, batch: int, size: int, axis: int) -> tuple[int, ...]:
    """The shape ``generate_sample`` gives one input."""
    return tuple((batch if i == axis else size) if d < 0 else d for i, d in enumerate(spec.shape))


def sample_candidates(signature: Signature, batch_axes: dict[str, int]) -> list[tuple[int, int]]:
    """The (batch, free size) pairs to try for a generated sample, best first.

    A model whose only free dimension is the batch axis gets the batch sizes alone.
    """
    has_other = any(
        d < 0 and i != batch_axes.get(spec.name, 0)
        for spec in signature.inputs
        for i, d in enumerate(spec.shape)
    )
    sizes = FREE_DIM_SIZES if has_other else (1,)
    pairs = []
    for batch in BATCH_SIZES:
        for size in sizes:
            shapes = [
                generated_shape(s, batch=batch, size=size, axis=batch_axes.get(s.name, 0))
                for s in signature.inputs
            ]
            if all(int(np.prod(shape)) <= MAX_GENERATED_ELEMENTS for shape in shapes):
                pairs.append((batch, size))
    return pairs


def _random_tensor(
    spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray[Any, Any]:
    if spec.datatype == "BYTES":
        return np.array([f"sample-{i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(
            shape
        )
    if spec.datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    dtype = spec.numpy_dtype
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(size=shape).astype(dtype)
    # Integer inputs are often indices (token ids, categories): keep them small and valid.
    return rng.integers(0, 2, size=shape).astype(dtype)


def load_sample(path: Path, signature: Signature) -> Arrays:
    """Read a user's sample and check it against the signature."""
    return conform(read_sample(path, [spec.name for spec in signature.inputs]), signature)


def read_sample(path: Path, input_names: list[str]) -> Arrays:
    """Read a user's sample as it is, before it is checked against a signature.

    ``input_names`` names the model's inputs: a bare array (.npy, a JSON list) is
    only accepted for a single-input model and takes that input's name.
    """
    size = path.stat().st_size
    if size == 0:
        raise InvalidSample("The sample input file is empty.")
    if size > MAX_SAMPLE_BYTES:
        raise InvalidSample(
            f"The sample input is {size // (1024 * 1024)} MB; keep it under "
            f"{MAX_SAMPLE_BYTES // (1024 * 1024)} MB (a few rows are enough)."
        )
    head = path.read_bytes()[:8]
    if head.startswith(b"\x93NUMPY"):
        return _from_npy(path, input_names)
    if head.startswith(b"PK"):
        return _from_npz(path)
    return _from_json(path, input_names)


def _from_npy(path: Path, input_names: list[str]) -> Arrays:
    if len(input_names) != 1:
        raise InvalidSample(
            f"A .npy sample holds one array, but the model has {len(input_names)} inputs "
            f"({', '.join(input_names)}). Upload an .npz with one array per input name."
        )
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InvalidSample(
            f"The .npy sample could not be read without unpickling ({exc}). Save it with a "
            "numeric or string dtype, not dtype=object."
        ) from exc
    return {input_names[0]: array}


def _from_npz(path: Path) -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        raise InvalidSample(f"The .npz sample could not be read: {exc}") from exc


def _from_json(path: Path, input_names: list[str]) -> Arrays:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidSample(f"The sample input is not .npy, .npz or valid JSON ({exc}).") from exc
    if isinstance(document, dict) and isinstance(document.get("inputs"), list):
        arrays: Arrays = {}
        for item in document["inputs"]:
            if not isinstance(item, dict) or "name" not in item or "data" not in item:
                raise InvalidSample(
                    'Each entry of "inputs" needs at least "name" and "data" (and "shape").'
                )
            data = np.array(item["data"])
            if "shape" in item:
                try:
                    data = data.reshape(item["shape"])
                except ValueError as exc:
                    raise InvalidSample(f"Input {item['name']}: {exc}") from exc
            arrays[str(item["name"])] = data
        return arrays
    if isinstance(document, dict):
        return {str(name): np.array(value) for name, value in document.items()}
    if isinstance(document, list) and len(input_names) == 1:
        return {input_names[0]: np.array(document)}
    raise InvalidSample(
        'A JSON sample is either {"input name": [...]} or a V2 request {"inputs": [...]}.'
    )


def conform(arrays: Arrays, signature: Signature) -> Arrays:
    """Check names, ranks and fixed dimensions, and cast to the model's dtypes."""
    expected = {spec.name: spec for spec in signature.inputs}
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        raise InvalidSample(
            f"The sample's inputs do not match the model ({'; '.join(parts)}). "
            f"The model expects: {', '.join(expected)}."
        )
    result: Arrays = {}
    for name, spec in expected.items():
        array = arrays[name]
        if array.ndim != len(spec.shape):
            raise InvalidSample(
                f"Input {name} has shape {list(array.shape)} but the model expects "
                f"{len(spec.shape)} dimensions ({_shape_text(spec)})."
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if want >= 0 and got != want:
                raise InvalidSample(
                    f"Input {name} has size {got} in dimension {axis}, the model expects "
                    f"{want} ({_shape_text(spec)})."
                )
        result[name] = _cast(name, array, spec)
    return result


def _cast(name: str, array: np.ndarray[Any, Any], spec: TensorSpec) -> np.ndarray[Any, Any]:
    if spec.datatype == "BYTES":
        if array.dtype.kind not in "USO":
            raise InvalidSample(f"Input {name} must hold strings, got {array.dtype}.")
        return array.astype(object)
    if array.dtype.kind in "USO":
        raise InvalidSample(f"Input {name} must be {spec.datatype}, got strings.")
    target = spec.numpy_dtype
    fractional = array.dtype.kind == "f" and target.kind in "iu" and spec.datatype != "BOOL"
    if fractional and not np.all(np.mod(array, 1) == 0):
        raise InvalidSample(f"Input {name} must be {spec.datatype}; it holds fractions.")
    return array.astype(target)


def _shape_text(spec: TensorSpec) -> str:
    dims = ", ".join("any" if d < 0 else str(d) for d in spec.shape)
    return f"[{dims}]"


def save_known_answer(path: Path, inputs: Arrays, outputs: Arrays) -> None:
    """Store inputs and the outputs they must produce, without pickled objects."""
    payload = {f"input:{k}": _storable(v) for k, v in inputs.items()}
    payload.update({f"output:{k}": _storable(v) for k, v in outputs.items()})
    with path.open("wb") as handle:
        np.savez(handle, allow_pickle=False, **payload)


def load_known_answer(path: Path) -> tuple[Arrays, Arrays]:
    """Read a known answer written by ``save_known_answer``."""
    inputs: Arrays = {}
    outputs: Arrays = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            kind, _, name = key.partition(":")
            (inputs if kind == "input" else outputs)[name] = archive[key]
    return inputs, outputs


def _storable(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if array.dtype == object:
        return np.array(
            [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in array.ravel()
            ],
            dtype=str,
        ).reshape(array.shape)
    return array
