"""Output of a batch job: one part file per finished chunk, joined at the end.

A part is written to a scratch name, flushed to disk and renamed, so a part that
exists is whole; the job's checkpoint names the parts that count. The output keeps
the input's format with prediction columns and an error column appended (``.npz``
for ``.npy`` and ``.npz`` input).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from deployer.batch.formats import Chunk, InputFormat

ERROR_COLUMN = "error"

OUTPUT_SUFFIX = {
    InputFormat.CSV: ".csv",
    InputFormat.PARQUET: ".parquet",
    InputFormat.JSONL: ".jsonl",
    InputFormat.NPY: ".npz",
    InputFormat.NPZ: ".npz",
}


def output_names(outputs: list[str], input_columns: list[str]) -> dict[str, str]:
    """Column name for each output (and the error column), clear of the input's names."""
    taken = set(input_columns)
    names = {}
    for name in [*outputs, ERROR_COLUMN]:
        chosen = name
        while chosen in taken:
            chosen = f"{chosen}_pred"
        taken.add(chosen)
        names[name] = chosen
    return names


def full_outputs(
    outputs: dict[str, np.ndarray], ok: np.ndarray, rows: int
) -> dict[str, np.ndarray]:
    """Outputs for every row of a chunk: the scored rows' values, a blank for the others."""
    full = {}
    for name, values in outputs.items():
        if values.shape[0] == rows:
            full[name] = values
            continue
        blank = np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
        if values.dtype.kind == "f":
            blank[:] = np.nan
        elif values.dtype.kind in "OUS":
            blank = blank.astype(object)
            blank[:] = ""
        blank[ok] = values
        full[name] = blank
    return full


def _fsync_replace(scratch: Path, final: Path) -> None:
    with scratch.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(scratch, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def part_path(parts_dir: Path, index: int, fmt: InputFormat) -> Path:
    return parts_dir / f"part-{index:08d}{OUTPUT_SUFFIX[fmt]}"


def write_part(
    *,
    fmt: InputFormat,
    chunk: Chunk,
    outputs: dict[str, np.ndarray],
    errors: list[str | None],
    names: dict[str, str],
    parts_dir: Path,
) -> Path:
    """Write one chunk's output durably; return its path."""
    final = part_path(parts_dir, chunk.index, fmt)
    scratch = final.with_name(final.name + ".tmp")
    if fmt is InputFormat.CSV:
        _csv_part(scratch, chunk, outputs, errors, names, header=chunk.index == 0)
    elif fmt is InputFormat.PARQUET:
        _parquet_part(scratch, chunk, outputs, errors, names)
    elif fmt is InputFormat.JSONL:
        _jsonl_part(scratch, chunk, outputs, errors, names)
    else:
        _npz_part(scratch, chunk, outputs, errors, names)
    _fsync_replace(scratch, final)
    return final


def _flat_columns(outputs: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, Any]:
    """Each output as scalar columns: ``out`` for one value per row, ``out_0``... otherwise."""
    columns: dict[str, Any] = {}
    for name, values in outputs.items():
        flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values[:, None]
        if flat.shape[1] == 1:
            columns[names[name]] = flat[:, 0]
        else:
            for i in range(flat.shape[1]):
                columns[f"{names[name]}_{i}"] = flat[:, i]
    return columns


def _arrow_array(values: np.ndarray, errors: list[str | None]) -> Any:
    import pyarrow as pa

    mask = np.array([e is not None for e in errors], dtype=bool)
    if values.dtype.kind == "O":
        values = values.astype(str)
    return pa.array(values, mask=mask if mask.any() else None)


def _csv_part(
    path: Path,
    chunk: Chunk,
    outputs: dict[str, np.ndarray],
    errors: list[str | None],
    names: dict[str, str],
    *,
    header: bool,
) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    table = chunk.table
    for column, values in _flat_columns(outputs, names).items():
        table = table.append_column(column, _arrow_array(values, errors))
    table = table.append_column(names[ERROR_COLUMN], pa.array([e or "" for e in errors]))
    pcsv.write_csv(table, path, pcsv.WriteOptions(include_header=header))


def _parquet_part(
    path: Path,
    chunk: Chunk,
    outputs: dict[str, np.ndarray],
    errors: list[str | None],
    names: dict[str, str],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = chunk.table
    mask = np.array([e is not None for e in errors], dtype=bool)
    for name, values in outputs.items():
        if values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1):
            column = _arrow_array(values.reshape(-1), errors)
        else:
            flat = values.reshape(values.shape[0], -1)
            inner = pa.array(flat.reshape(-1))
            column = pa.FixedSizeListArray.from_arrays(
                inner, flat.shape[1], mask=pa.array(mask) if mask.any() else None
            )
        table = table.append_column(names[name], column)
    table = table.append_column(names[ERROR_COLUMN], pa.array(errors, type=pa.string()))
    pq.write_table(table, path)


def _jsonl_part(
    path: Path,
    chunk: Chunk,
    outputs: dict[str, np.ndarray],
    errors: list[str | None],
    names: dict[str, str],
) -> None:
    lists = {name: values.tolist() for name, values in outputs.items()}
    with path.open("w", encoding="utf-8") as handle:
        for row, record in enumerate(chunk.records):
            line = dict(record) if isinstance(record, dict) else {}
            for name, values in lists.items():
                line[names[name]] = None if errors[row] is not None else values[row]
            line[names[ERROR_COLUMN]] = errors[row]
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")


def _npz_part(
    path: Path,
    chunk: Chunk,
    outputs: dict[str, np.ndarray],
    errors: list[str | None],
    names: dict[str, str],
) -> None:
    arrays = dict(chunk.arrays)
    for name, values in outputs.items():
        arrays[names[name]] = values.astype(str) if values.dtype.kind == "O" else values
    arrays[names[ERROR_COLUMN]] = np.array([e or "" for e in errors], dtype=str)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


# ---------------------------------------------------------------- joining the parts


def assemble(*, fmt: InputFormat, parts: list[Path], out: Path) -> str:
    """Join the parts into ``out`` (replaced whole at the end); return its SHA-256."""
    scratch = out.with_name(out.name + ".tmp")
    if fmt in (InputFormat.CSV, InputFormat.JSONL):
        with scratch.open("wb") as target:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(1 << 20):
                        target.write(block)
    elif fmt is InputFormat.PARQUET:
        _join_parquet(parts, scratch)
    else:
        _join_npz(parts, scratch)
    _fsync_replace(scratch, out)
    return file_sha256(out)


def _join_parquet(parts: list[Path], scratch: Path) -> None:
    import pyarrow.parquet as pq

    writer = None
    try:
        for part in parts:
            table = pq.read_table(part)
            if writer is None:
                writer = pq.ParquetWriter(scratch, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        scratch.write_bytes(b"")


def _join_npz(parts: list[Path], scratch: Path) -> None:
    """One .npz with each array's parts one after the other, written as a stream."""
    if not parts:
        with zipfile.ZipFile(scratch, "w"):
            return
    with np.load(parts[0]) as first:
        names = list(first.files)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype[Any]] = {}
    rows = 0
    for part in parts:
        with np.load(part) as loaded:
            for name in names:
                array = loaded[name]
                if name in dtypes and array.dtype.kind == "U":
                    wider = max(dtypes[name].itemsize, array.dtype.itemsize)
                    dtypes[name] = np.dtype(f"<U{wider // 4}")
                else:
                    dtypes.setdefault(name, array.dtype)
                shapes[name] = array.shape[1:]
            rows += int(loaded[names[0]].shape[0])
    with zipfile.ZipFile(scratch, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in names:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtypes[name]),
                    "fortran_order": False,
                    "shape": (rows, *shapes[name]),
                }
                np.lib.format.write_array_header_2_0(member, header)
                for part in parts:
                    with np.load(part) as loaded:
                        member.write(
                            np.ascontiguousarray(loaded[name], dtype=dtypes[name]).tobytes()
                        )


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
