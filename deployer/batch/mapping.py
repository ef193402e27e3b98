"""Which columns of a batch file feed which model input, and turning a chunk into feeds.

A mapping is checked against the model's signature before a job starts: a missing
column, a width that does not fit an input's shape or text for a numeric input is
refused with the column and the input named. What only a row can tell (a cell that
is not a number, a list of the wrong length) becomes that row's error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployer.batch.formats import Chunk, Column, ColumnKind
from deployer.errors import DeployerError
from deployer.signature import Signature, TensorSpec


class MappingError(DeployerError):
    """Columns do not fit the model's inputs; names the column and the input."""

    code = "mapping_mismatch"

    def __init__(self, message: str, *, column: str = "", input_name: str = "") -> None:
        super().__init__(message)
        self.column = column
        self.input_name = input_name


@dataclass(frozen=True)
class InputMapping:
    """For each model input, the columns (in order) its values come from."""

    columns: tuple[tuple[str, tuple[str, ...]], ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {name: list(cols) for name, cols in self.columns}


def _describe(spec: TensorSpec) -> str:
    return f"input '{spec.name}' ({spec.datatype}, shape {list(spec.shape)})"


def _row_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The shape of one row's value for an input (its shape without the batch axis)."""
    return spec.shape[1:] if spec.shape else ()


def _width(shape: tuple[int, ...]) -> int:
    """Values per row, or -1 when a free dimension makes it vary."""
    return -1 if any(d < 0 for d in shape) else math.prod(shape)


def plan_mapping(
    signature: Signature,
    columns: Sequence[Column],
    requested: Mapping[str, str | Sequence[str]] | None = None,
) -> InputMapping:
    """The mapping for a file's columns: as requested, else by name, else all columns."""
    by_name = {c.name: c for c in columns}
    inputs = {s.name: s for s in signature.inputs}
    requested = dict(requested or {})
    for name in requested:
        if name not in inputs:
            raise MappingError(
                f"The mapping names input '{name}', which the model does not have "
                f"(its inputs: {', '.join(inputs)}).",
                input_name=name,
            )
    chosen = []
    for spec in signature.inputs:
        if spec.name in requested:
            wanted = requested[spec.name]
            cols = (wanted,) if isinstance(wanted, str) else tuple(wanted)
        elif spec.name in by_name:
            cols = (spec.name,)
        elif len(signature.inputs) == 1 and _fits_all(spec, columns):
            cols = tuple(c.name for c in columns)
        else:
            listed = ", ".join(by_name) or "none"
            raise MappingError(
                f"No column feeds {_describe(spec)}: the file has no column named "
                f"'{spec.name}' (its columns: {listed}); give a mapping for it.",
                input_name=spec.name,
            )
        for col in cols:
            if col not in by_name:
                raise MappingError(
                    f"Column '{col}' mapped to {_describe(spec)} is not in the file "
                    f"(its columns: {', '.join(by_name) or 'none'}).",
                    column=col,
                    input_name=spec.name,
                )
        _check(spec, [by_name[c] for c in cols])
        chosen.append((spec.name, cols))
    return InputMapping(columns=tuple(chosen))


def _fits_all(spec: TensorSpec, columns: Sequence[Column]) -> bool:
    if len(columns) == 1:
        return True
    width = _width(_row_shape(spec))
    return width == len(columns) and all(not c.shape for c in columns)


def _check(spec: TensorSpec, cols: list[Column]) -> None:
    """Refuse columns whose kind or width cannot feed ``spec``."""
    numeric = spec.datatype != "BYTES"
    for col in cols:
        if numeric and col.kind == ColumnKind.STRING:
            raise MappingError(
                f"Column '{col.name}' holds text; {_describe(spec)} takes numbers.",
                column=col.name,
                input_name=spec.name,
            )
        if not numeric and col.kind in (ColumnKind.NUMBER, ColumnKind.BOOL):
            raise MappingError(
                f"Column '{col.name}' holds numbers; {_describe(spec)} takes text.",
                column=col.name,
                input_name=spec.name,
            )
    row_shape = _row_shape(spec)
    width = _width(row_shape)
    if len(cols) > 1:
        tensor = next((c for c in cols if c.shape), None)
        if tensor is not None:
            raise MappingError(
                f"Column '{tensor.name}' holds a list per row; several columns for "
                f"{_describe(spec)} must each hold one value.",
                column=tensor.name,
                input_name=spec.name,
            )
        if width != len(cols):
            raise MappingError(
                f"{len(cols)} columns ({', '.join(repr(c.name) for c in cols)}) cannot feed "
                f"{_describe(spec)}, which takes "
                f"{'a varying number of' if width < 0 else width} values per row.",
                column=cols[0].name,
                input_name=spec.name,
            )
        return
    col = cols[0]
    if not col.shape:
        if width not in (1, -1):
            raise MappingError(
                f"Column '{col.name}' holds one value per row; {_describe(spec)} takes "
                f"{width} values per row (map {width} columns, or one list column).",
                column=col.name,
                input_name=spec.name,
            )
        return
    if not _shapes_fit(col.shape, row_shape):
        raise MappingError(
            f"Column '{col.name}' holds values of shape {list(col.shape)} per row; "
            f"{_describe(spec)} takes shape {list(row_shape)} per row.",
            column=col.name,
            input_name=spec.name,
        )


def _shapes_fit(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    if _width(have) > 0 and _width(want) > 0 and _width(have) == _width(want):
        return len(have) == len(want) or len(want) == 1 or len(have) == 1
    if len(have) != len(want):
        return len(have) == 1 and have[0] < 0
    return all(h < 0 or w < 0 or h == w for h, w in zip(have, want, strict=True))


# ---------------------------------------------------------------- chunk -> feeds


@dataclass
class Feeds:
    """A chunk's model inputs for the rows that converted, and the errors of the others."""

    arrays: dict[str, np.ndarray]
    ok: np.ndarray  # bool per row of the chunk
    errors: dict[int, str]


def chunk_feeds(chunk: Chunk, mapping: InputMapping, signature: Signature) -> Feeds:
    """Convert one chunk; a row that does not fit is left out with its error."""
    specs = {s.name: s for s in signature.inputs}
    errors: dict[int, str] = {}
    converted: dict[str, np.ndarray] = {}
    for name, cols in mapping.columns:
        spec = specs[name]
        converted[name] = _convert(chunk, spec, cols, errors)
    ok = np.ones(chunk.rows, dtype=bool)
    if errors:
        ok[list(errors)] = False
    arrays = {name: values[ok] if errors else values for name, values in converted.items()}
    return Feeds(arrays=arrays, ok=ok, errors=errors)


def _target_shape(spec: TensorSpec, width: int) -> tuple[int, ...]:
    row_shape = _row_shape(spec)
    if _width(row_shape) < 0:
        free = [d for d in row_shape if d >= 0]
        known = math.prod(free) if free else 1
        return tuple(width // known if d < 0 else d for d in row_shape)
    return row_shape


def _convert(chunk: Chunk, spec: TensorSpec, cols: tuple[str, ...], errors: dict[int, str]) -> Any:
    dtype = spec.numpy_dtype
    if chunk.table is not None:
        parts = [_arrow_values(chunk.table.column(c), c, spec, errors) for c in cols]
    elif chunk.arrays:
        parts = [_array_values(chunk.arrays[c], c, spec, errors) for c in cols]
    else:
        parts = [_json_values(chunk.records, c, spec, errors) for c in cols]
    flat = parts[0] if len(parts) == 1 else np.stack(parts, axis=1)
    flat = flat.reshape(chunk.rows, -1) if flat.ndim > 1 or len(parts) > 1 else flat
    width = flat.shape[1] if flat.ndim > 1 else 1
    shape = _target_shape(spec, width)
    return flat.reshape((chunk.rows, *shape)).astype(dtype, copy=False)


def _fill(spec: TensorSpec) -> Any:
    return "" if spec.datatype == "BYTES" else 0


def _arrow_values(column: Any, name: str, spec: TensorSpec, errors: dict[int, str]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    dtype = spec.numpy_dtype
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _list_values(column.to_pylist(), name, spec, errors)
    if spec.datatype == "BYTES":
        values = column.to_pylist()
        for row, value in enumerate(values):
            if value is None:
                errors.setdefault(row, f"column '{name}' is empty")
        return np.array(["" if v is None else str(v) for v in values], dtype=object)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        target = pa.bool_() if spec.datatype == "BOOL" else pa.float64()
        try:
            return pc.cast(column, target).to_numpy(zero_copy_only=False).astype(dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return _parse_text(column.to_pylist(), name, spec, errors)
    if column.null_count:
        for null_row in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)):
            errors.setdefault(int(null_row), f"column '{name}' is empty")
        column = column.fill_null(0)
    return column.to_numpy(zero_copy_only=False).astype(dtype)


def _parse_text(values: list[Any], name: str, spec: TensorSpec, errors: dict[int, str]) -> Any:
    out = np.zeros(len(values), dtype=spec.numpy_dtype)
    for row, value in enumerate(values):
        try:
            if spec.datatype == "BOOL":
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[row] = str(value).lower() in ("true", "1")
            else:
                out[row] = float(value)
        except (TypeError, ValueError, OverflowError):
            errors.setdefault(row, f"column '{name}': {value!r} is not a {spec.datatype} value")
    return out


def _list_values(values: list[Any], name: str, spec: TensorSpec, errors: dict[int, str]) -> Any:
    """Per-row lists (Parquet lists, JSON arrays): a row of the wrong shape is an error."""
    dtype = np.dtype(object) if spec.datatype == "BYTES" else spec.numpy_dtype
    try:
        stacked = np.asarray(values, dtype=dtype)
        if stacked.ndim >= 2 and _shapes_fit(stacked.shape[1:], _row_shape(spec)):
            return stacked.reshape(len(values), -1)
    except (TypeError, ValueError, OverflowError):
        pass
    row_shape = _row_shape(spec)
    width = _width(row_shape)
    good: list[np.ndarray] = []
    for row, value in enumerate(values):
        try:
            item = np.asarray(value, dtype=dtype)
            if value is None or item.ndim == 0 or not _shapes_fit(item.shape, row_shape):
                raise ValueError(f"shape {list(np.shape(value))}")
            good.append(item.reshape(-1))
        except (TypeError, ValueError, OverflowError) as exc:
            errors.setdefault(
                row,
                f"column '{name}': the value does not fit {spec.datatype} shape "
                f"{list(row_shape)} ({exc})",
            )
            good.append(np.zeros(max(width, 1), dtype=dtype))
    widths = {g.shape[0] for row, g in enumerate(good) if row not in errors}
    common = widths.pop() if len(widths) == 1 else max(width, 1)
    for row, g in enumerate(good):
        if g.shape[0] != common and row not in errors:
            errors[row] = f"column '{name}': {g.shape[0]} values where other rows have {common}"
    return np.stack(
        [g if g.shape[0] == common else np.zeros(common, dtype=dtype) for g in good]
    ).reshape(len(values), common)


def _array_values(values: np.ndarray, name: str, spec: TensorSpec, errors: dict[int, str]) -> Any:
    del name, spec, errors  # an array's rows all have its dtype and shape
    return values.reshape(values.shape[0], -1) if values.ndim > 1 else values


def _json_values(
    records: list[dict[str, Any] | str], name: str, spec: TensorSpec, errors: dict[int, str]
) -> Any:
    values: list[Any] = []
    for row, record in enumerate(records):
        if isinstance(record, str):
            errors.setdefault(row, record)
            values.append(None)
        elif name not in record:
            errors.setdefault(row, f"the row has no '{name}'")
            values.append(None)
        else:
            values.append(record[name])
    if _row_shape(spec) and _width(_row_shape(spec)) != 1:
        return _list_values(values, name, spec, errors)
    out = np.zeros(len(values), dtype=object if spec.datatype == "BYTES" else spec.numpy_dtype)
    for row, value in enumerate(values):
        if row in errors:
            out[row] = _fill(spec)
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        try:
            if spec.datatype == "BYTES":
                if not isinstance(value, str):
                    raise TypeError(type(value).__name__)
                out[row] = value
            elif isinstance(value, bool | int | float):
                out[row] = value
            else:
                raise TypeError(type(value).__name__)
        except (TypeError, ValueError, OverflowError):
            errors[row] = f"'{name}': {value!r} is not a {spec.datatype} value"
            out[row] = _fill(spec)
    return out
