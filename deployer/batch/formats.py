"""Streaming readers of batch input files: fixed-size chunks, never the whole file.

Each reader describes its columns (what the mapping to model inputs is built from) and
yields chunks of ``chunk_rows`` rows from any row on, so a resumed job starts where
the last finished chunk ended. Peak memory is a few chunks, whatever the file's size.
"""

from __future__ import annotations

import enum
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deployer.errors import DeployerError

# Rows read to describe JSON Lines columns, and CSV blocks read per step.
SAMPLE_ROWS = 1000
CSV_BLOCK_BYTES = 1 << 20
# The one array of a .npy file is named as numpy names a positional array in a .npz.
NPY_COLUMN = "arr_0"


class BatchInputError(DeployerError):
    """The input file cannot be read as the format it claims."""

    code = "invalid_batch_input"


class InputFormat(enum.StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    JSONL = "jsonl"
    NPY = "npy"
    NPZ = "npz"


_SUFFIXES = {
    ".csv": InputFormat.CSV,
    ".parquet": InputFormat.PARQUET,
    ".pq": InputFormat.PARQUET,
    ".jsonl": InputFormat.JSONL,
    ".ndjson": InputFormat.JSONL,
    ".npy": InputFormat.NPY,
    ".npz": InputFormat.NPZ,
}


def detect_format(name: str) -> InputFormat:
    """The format a file name says (by its suffix); refuses an unknown one."""
    suffix = Path(name).suffix.lower()
    if suffix not in _SUFFIXES:
        known = ", ".join(sorted(_SUFFIXES))
        raise BatchInputError(f"{name}: unknown input format {suffix or '(none)'}; use {known}.")
    return _SUFFIXES[suffix]


class ColumnKind(enum.StrEnum):
    NUMBER = "number"
    BOOL = "bool"
    STRING = "string"
    # CSV cells: text whose type is decided by the input it maps to.
    TEXT = "text"
    # A list or array per row (Parquet lists, JSON arrays, .npy/.npz trailing axes).
    TENSOR = "tensor"


@dataclass(frozen=True)
class Column:
    """One column of an input file: its kind and the shape of one row's value (-1: varies)."""

    name: str
    kind: ColumnKind
    shape: tuple[int, ...] = ()
    dtype: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": str(self.kind), "shape": list(self.shape)}


@dataclass
class Chunk:
    """``rows`` rows starting at row ``start``, as the format holds them."""

    index: int
    start: int
    rows: int
    # CSV (all text) and Parquet: a pyarrow Table.
    table: Any = None
    # JSON Lines: one parsed object per row, or the parse error of that line.
    records: list[dict[str, Any] | str] = field(default_factory=list)
    # .npy / .npz: one array per column, first axis the rows.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class Reader:
    """Reads one input file in chunks."""

    format: InputFormat
    columns: tuple[Column, ...]
    # Known up front for every format (text formats count their lines once).
    total_rows: int

    def __init__(self, path: Path, chunk_rows: int) -> None:
        if chunk_rows < 1:
            raise BatchInputError("chunk_rows must be at least 1.")
        self.path = path
        self.chunk_rows = chunk_rows

    def chunks(self, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks from ``start_chunk`` to the end of the file."""
        raise NotImplementedError


def open_reader(path: Path, fmt: InputFormat, chunk_rows: int) -> Reader:
    """A reader for ``path`` in format ``fmt``; a file it cannot read is refused here."""
    readers: dict[InputFormat, type[Reader]] = {
        InputFormat.CSV: CsvReader,
        InputFormat.PARQUET: ParquetReader,
        InputFormat.JSONL: JsonLinesReader,
        InputFormat.NPY: NpyReader,
        InputFormat.NPZ: NpzReader,
    }
    try:
        return readers[fmt](path, chunk_rows)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BatchInputError(f"{path.name} is not a readable {fmt} file: {exc}") from exc


def _count_lines(path: Path) -> int:
    """Newline-terminated lines, plus a last line without one (read in blocks)."""
    count, last = 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(CSV_BLOCK_BYTES * 4):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _rebatch(batches: Iterator[Any], chunk_rows: int, skip_rows: int) -> Iterator[Any]:
    """pyarrow record batches of any size, as tables of exactly ``chunk_rows`` rows."""
    import pyarrow as pa

    pending: list[Any] = []
    held = 0
    for batch in batches:
        if skip_rows:
            if batch.num_rows <= skip_rows:
                skip_rows -= batch.num_rows
                continue
            batch, skip_rows = batch.slice(skip_rows), 0
        pending.append(batch)
        held += batch.num_rows
        while held >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows).combine_chunks()
            rest = table.slice(chunk_rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


class CsvReader(Reader):
    """CSV with a header line; every cell is read as text, converted per input later."""

    format = InputFormat.CSV

    def __init__(self, path: Path, chunk_rows: int) -> None:
        super().__init__(path, chunk_rows)
        import pyarrow.csv as pcsv

        first = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
        names = first.schema.names
        first.close()
        self._names = names
        self.columns = tuple(Column(name, ColumnKind.TEXT) for name in names)
        self.total_rows = max(_count_lines(path) - 1, 0)

    def chunks(self, start_chunk: int = 0) -> Iterator[Chunk]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        stream = pcsv.open_csv(
            self.path,
            read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in self._names},
                strings_can_be_null=False,
            ),
        )
        start = start_chunk * self.chunk_rows
        try:
            for index, table in enumerate(_rebatch(iter(stream), self.chunk_rows, start)):
                rows = table.num_rows
                yield Chunk(index=start_chunk + index, start=start, rows=rows, table=table)
                start += rows
        except pa.ArrowInvalid as exc:
            raise BatchInputError(f"{self.path.name}: the CSV cannot be parsed: {exc}") from exc
        finally:
            stream.close()


class ParquetReader(Reader):
    """Parquet, read a row group at a time; types come from its schema."""

    format = InputFormat.PARQUET

    def __init__(self, path: Path, chunk_rows: int) -> None:
        super().__init__(path, chunk_rows)
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(path)
        self.total_rows = int(self._file.metadata.num_rows)
        self.columns = tuple(_arrow_column(f) for f in self._file.schema_arrow)

    def chunks(self, start_chunk: int = 0) -> Iterator[Chunk]:
        skip = start_chunk * self.chunk_rows
        groups, row = [], 0
        for group in range(self._file.num_row_groups):
            size = self._file.metadata.row_group(group).num_rows
            if row + size <= skip:
                row += size
                continue
            groups.append(group)
        if not groups:
            return
        batches = self._file.iter_batches(batch_size=min(self.chunk_rows, 65536), row_groups=groups)
        start = start_chunk * self.chunk_rows
        for index, table in enumerate(_rebatch(batches, self.chunk_rows, skip - row)):
            yield Chunk(index=start_chunk + index, start=start, rows=table.num_rows, table=table)
            start += table.num_rows


def _arrow_column(arrow_field: Any) -> Column:
    import pyarrow as pa

    kind_of = arrow_field.type
    name = arrow_field.name
    if pa.types.is_boolean(kind_of):
        return Column(name, ColumnKind.BOOL, dtype="bool")
    if pa.types.is_integer(kind_of) or pa.types.is_floating(kind_of):
        return Column(name, ColumnKind.NUMBER, dtype=str(kind_of.to_pandas_dtype().__name__))
    if pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of):
        return Column(name, ColumnKind.STRING, dtype="str")
    if pa.types.is_fixed_size_list(kind_of):
        return Column(name, ColumnKind.TENSOR, shape=(kind_of.list_size,))
    if pa.types.is_list(kind_of) or pa.types.is_large_list(kind_of):
        return Column(name, ColumnKind.TENSOR, shape=(-1,))
    return Column(name, ColumnKind.STRING, dtype=str(kind_of))


class JsonLinesReader(Reader):
    """One JSON object per line; a line that does not parse is that row's error."""

    format = InputFormat.JSONL

    def __init__(self, path: Path, chunk_rows: int) -> None:
        super().__init__(path, chunk_rows)
        seen: dict[str, Column] = {}
        with path.open("rb") as handle:
            for count, line in enumerate(handle):
                if count >= SAMPLE_ROWS:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    for key, value in record.items():
                        seen.setdefault(key, _json_column(key, value))
        self.columns = tuple(seen.values())
        self.total_rows = _count_lines(path)

    def chunks(self, start_chunk: int = 0) -> Iterator[Chunk]:
        skip = start_chunk * self.chunk_rows
        index, start = start_chunk, skip
        records: list[dict[str, Any] | str] = []
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle):
                if number < skip:
                    continue
                records.append(_parse_line(line, number + 1))
                if len(records) == self.chunk_rows:
                    yield Chunk(index=index, start=start, rows=len(records), records=records)
                    index, start, records = index + 1, start + len(records), []
        if records:
            yield Chunk(index=index, start=start, rows=len(records), records=records)


def _parse_line(line: bytes, number: int) -> dict[str, Any] | str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        return f"line {number} is not JSON: {exc}"
    if not isinstance(record, dict):
        return f"line {number} is not a JSON object"
    return record


def _json_column(name: str, value: Any) -> Column:
    if isinstance(value, bool):
        return Column(name, ColumnKind.BOOL)
    if isinstance(value, int | float):
        return Column(name, ColumnKind.NUMBER)
    if isinstance(value, list):
        return Column(name, ColumnKind.TENSOR, shape=np.shape(value) or (-1,))
    return Column(name, ColumnKind.STRING)


def _npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), dtype, bool(fortran)


def _array_column(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Column:
    if not shape:
        raise BatchInputError(f"{name} is a single value, not one row per first-axis entry.")
    if dtype.hasobject:
        raise BatchInputError(f"{name} holds Python objects, which are not read (no pickles).")
    kind = ColumnKind.STRING if dtype.kind in "US" else ColumnKind.NUMBER
    if dtype.kind == "b":
        kind = ColumnKind.BOOL
    if len(shape) > 1:
        kind = ColumnKind.TENSOR
    return Column(name, kind, shape=tuple(shape[1:]), dtype=dtype.str)


class _ArrayStream:
    """Rows of one C-order .npy stream (a file, or a member of a .npz) read by seeking."""

    def __init__(self, handle: BinaryIO, name: str) -> None:
        self.handle = handle
        self.shape, self.dtype, fortran = _npy_header(handle)
        if fortran and len(self.shape) > 1:
            raise BatchInputError(f"{name} is stored in Fortran order; save it in C order.")
        self.column = _array_column(name, self.shape, self.dtype)
        self.data_start = handle.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, first: int, count: int) -> np.ndarray:
        count = max(0, min(count, self.shape[0] - first))
        self.handle.seek(self.data_start + first * self.row_bytes)
        raw = self.handle.read(count * self.row_bytes)
        if len(raw) != count * self.row_bytes:
            raise BatchInputError(f"{self.column.name} ends before its {self.shape[0]} rows.")
        return np.frombuffer(raw, dtype=self.dtype).reshape((count, *self.shape[1:]))


class NpyReader(Reader):
    """One array; its first axis is the rows."""

    format = InputFormat.NPY

    def __init__(self, path: Path, chunk_rows: int) -> None:
        super().__init__(path, chunk_rows)
        with path.open("rb") as handle:
            stream = _ArrayStream(handle, NPY_COLUMN)
        self.columns = (stream.column,)
        self.total_rows = stream.shape[0]

    def chunks(self, start_chunk: int = 0) -> Iterator[Chunk]:
        with self.path.open("rb") as handle:
            stream = _ArrayStream(handle, NPY_COLUMN)
            yield from _array_chunks({NPY_COLUMN: stream}, self, start_chunk)


class NpzReader(Reader):
    """Several arrays with the same number of rows (``np.savez``, compressed or not)."""

    format = InputFormat.NPZ

    def __init__(self, path: Path, chunk_rows: int) -> None:
        super().__init__(path, chunk_rows)
        with zipfile.ZipFile(path) as archive:
            streams = self._streams(archive)
            self.columns = tuple(s.column for s in streams.values())
            rows = {name: s.shape[0] for name, s in streams.items()}
        if not rows:
            raise BatchInputError(f"{path.name} holds no arrays.")
        if len(set(rows.values())) > 1:
            found = ", ".join(f"{n}: {r}" for n, r in rows.items())
            raise BatchInputError(f"The arrays of {path.name} differ in rows ({found}).")
        self.total_rows = next(iter(rows.values()))

    @staticmethod
    def _streams(archive: zipfile.ZipFile) -> dict[str, _ArrayStream]:
        streams = {}
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            streams[name] = _ArrayStream(archive.open(info), name)  # type: ignore[arg-type]
        return streams

    def chunks(self, start_chunk: int = 0) -> Iterator[Chunk]:
        with zipfile.ZipFile(self.path) as archive:
            yield from _array_chunks(self._streams(archive), self, start_chunk)


def _array_chunks(
    streams: dict[str, _ArrayStream], reader: Reader, start_chunk: int
) -> Iterator[Chunk]:
    index, start = start_chunk, start_chunk * reader.chunk_rows
    while start < reader.total_rows:
        arrays = {name: s.read(start, reader.chunk_rows) for name, s in streams.items()}
        rows = next(iter(arrays.values())).shape[0]
        yield Chunk(index=index, start=start, rows=rows, arrays=arrays)
        index, start = index + 1, start + rows


__all__ = [
    "NPY_COLUMN",
    "BatchInputError",
    "Chunk",
    "Column",
    "ColumnKind",
    "InputFormat",
    "Reader",
    "detect_format",
    "open_reader",
]
