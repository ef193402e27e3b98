"""Running a batch job: chunks in, scored, written, checkpointed; resumable at any kill.

After every chunk its part file is durably on disk, then the checkpoint records the
chunk as done (and the error count with it). A run that starts with a checkpoint
continues at the next chunk and rewrites any part past it, so a run killed at any
instant and resumed gives every row exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from deployer.batch.formats import Chunk, Column, InputFormat, Reader, open_reader
from deployer.batch.mapping import InputMapping, MappingError, chunk_feeds, plan_mapping
from deployer.batch.scorer import (
    MAX_REQUEST_BYTES,
    RowsRefused,
    Scorer,
    merge_outputs,
    rows_per_request,
)
from deployer.batch.writers import (
    assemble,
    file_sha256,
    full_outputs,
    output_names,
    part_path,
    write_part,
)
from deployer.errors import DeployerError
from deployer.signature import Signature

FIRST_ERRORS_KEPT = 10
DEFAULT_CHUNK_ROWS = 4096
# The chunk sizes a job tries on its first rows when none is given (the fastest wins).
PROBE_CHUNK_ROWS = (1024, 4096, 16384, 65536)
T = TypeVar("T")


class BatchFailed(DeployerError):
    """More rows failed than the job allows; ``first_errors`` are the first of them."""

    code = "too_many_errors"

    def __init__(self, message: str, *, first_errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.first_errors = first_errors


class BatchCancelled(DeployerError):
    """The job was cancelled between two chunks."""

    code = "cancelled"


@dataclass(frozen=True)
class BatchRequest:
    """One job: the input, where its checkpoint and parts live, and its limits."""

    input_path: Path
    input_format: InputFormat
    work_dir: Path
    output_path: Path
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    mapping: Mapping[str, str | Sequence[str]] | None = None
    # Rows allowed to fail before the job fails; -1: any number.
    max_errors: int = 100


@dataclass(frozen=True)
class BatchPlan:
    """What a job will do, checked before it is created: columns, mapping, rows."""

    columns: tuple[Column, ...]
    mapping: InputMapping
    total_rows: int


@dataclass
class BatchProgress:
    """How far a job is; handed to ``on_progress`` after every chunk."""

    chunks_done: int
    rows_done: int
    total_rows: int
    errors: int
    rows_per_s: float
    eta_s: float | None
    first_errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class BatchResult:
    """A finished job."""

    rows: int
    errors: int
    first_errors: list[dict[str, Any]]
    output_path: Path
    output_sha256: str
    input_sha256: str
    seconds: float
    rows_per_s: float
    mapping: dict[str, list[str]]
    resumed_at_chunk: int


def plan_batch(
    signature: Signature,
    input_path: Path,
    fmt: InputFormat,
    mapping: Mapping[str, str | Sequence[str]] | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> BatchPlan:
    """Check a file against the model before a job starts (``MappingError`` if it cannot fit).

    Beyond names and shapes, the first rows are converted: a mapped column none of
    whose sampled rows converts (text in a CSV column for a numeric input) is refused.
    """
    reader = open_reader(input_path, fmt, min(chunk_rows, 1000))
    chosen = plan_mapping(signature, reader.columns, mapping)
    first = next(reader.chunks(0), None)
    if first is not None and first.rows:
        feeds = chunk_feeds(first, chosen, signature)
        if len(feeds.errors) == first.rows:
            message = feeds.errors[0]
            column = next(
                (c for _, cols in chosen.columns for c in cols if f"'{c}'" in message), ""
            )
            name = next((n for n, cols in chosen.columns if column in cols), "")
            raise MappingError(
                f"None of the first {first.rows} rows fits the model: {message} "
                f"(mapping: {chosen.as_dict()}).",
                column=column,
                input_name=name,
            )
    return BatchPlan(columns=reader.columns, mapping=chosen, total_rows=reader.total_rows)


@dataclass(frozen=True)
class ChunkProbe:
    """The chunk size a job runs at: the fastest of those tried on the file's first rows."""

    chosen: int
    # Rows per second the scorer gave at each size tried.
    rows_per_s: dict[int, float]

    def describe(self) -> str:
        tried = ", ".join(f"{rows:,}: {rate:,.0f} rows/s" for rows, rate in self.rows_per_s.items())
        return f"{self.chosen:,} rows per chunk, the fastest tried ({tried})"


def probe_chunk_rows(
    request: BatchRequest,
    scorer: Scorer,
    candidates: Sequence[int] = PROBE_CHUNK_ROWS,
    *,
    min_timed_rows: int = 8192,
    max_share: float = 0.05,
) -> ChunkProbe:
    """Score the file's first rows at each of ``candidates`` rows per chunk and time it.

    Each size scores the same first rows: two chunks' worth, at least ``min_timed_rows``
    (after one untimed request that opens the connection). A size is tried only when its
    rows are at most ``max_share`` of the file (the probe's work is not the job's), and
    when a chunk of it stays within one request's bytes (``MAX_REQUEST_BYTES`` of model
    input). With none to try, the job runs at ``DEFAULT_CHUNK_ROWS`` (or the whole file,
    or what fits a request, when smaller). The probe writes nothing.
    """
    head = open_reader(request.input_path, request.input_format, 64)
    sample = next(head.chunks(0), None)
    if sample is None or sample.rows == 0:
        return ChunkProbe(chosen=DEFAULT_CHUNK_ROWS, rows_per_s={})
    mapping = plan_mapping(scorer.signature, head.columns, request.mapping)
    small = chunk_feeds(sample, mapping, scorer.signature)
    row_bytes = max(sum(a.nbytes for a in small.arrays.values()) // max(len(small.ok), 1), 1)
    fit = max(MAX_REQUEST_BYTES // row_bytes, 1)
    total_rows = head.total_rows

    def timed(size: int) -> int:
        return max(2 * size, min_timed_rows) // size * size

    sizes = [
        size
        for size in sorted(set(candidates))
        if size <= fit and timed(size) <= max_share * total_rows
    ]
    if not sizes:
        return ChunkProbe(chosen=min(DEFAULT_CHUNK_ROWS, fit, max(total_rows, 1)), rows_per_s={})
    reader = open_reader(request.input_path, request.input_format, max(map(timed, sizes)))
    feeds = chunk_feeds(next(reader.chunks(0)), mapping, scorer.signature)
    rows = int(feeds.ok.sum())
    _score_chunk(scorer, _rows(feeds.arrays, 0, sizes[0]), np.ones(sizes[0], dtype=bool), {})
    rates: dict[int, float] = {}
    for size in sizes:
        total = min(timed(size), rows // size * size)
        if total == 0:
            continue
        started = time.perf_counter()
        for begin in range(0, total, size):
            _score_chunk(scorer, _rows(feeds.arrays, begin, size), np.ones(size, dtype=bool), {})
        rates[size] = total / max(time.perf_counter() - started, 1e-9)
    if not rates:
        return ChunkProbe(chosen=min(DEFAULT_CHUNK_ROWS, fit), rows_per_s={})
    return ChunkProbe(chosen=max(rates, key=lambda size: rates[size]), rows_per_s=rates)


def _rows(arrays: dict[str, np.ndarray], begin: int, count: int) -> dict[str, np.ndarray]:
    return {name: values[begin : begin + count] for name, values in arrays.items()}


class _Checkpoint:
    """The job's durable progress: chunks done, rows, errors (a JSON file, replaced whole)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.chunks_done = 0
        self.rows_done = 0
        self.errors = 0
        self.first_errors: list[dict[str, Any]] = []
        self.input_sha256 = ""
        self.fresh = True
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(loaded, dict) or loaded.get("fingerprint") != fingerprint:
            return
        self.chunks_done = int(loaded["chunks_done"])
        self.rows_done = int(loaded["rows_done"])
        self.errors = int(loaded["errors"])
        self.first_errors = list(loaded["first_errors"])
        self.input_sha256 = str(loaded["input_sha256"])
        self.fresh = False

    def save(self) -> None:
        data = {
            "fingerprint": self.fingerprint,
            "chunks_done": self.chunks_done,
            "rows_done": self.rows_done,
            "errors": self.errors,
            "first_errors": self.first_errors,
            "input_sha256": self.input_sha256,
        }
        scratch = self.path.with_name(self.path.name + ".tmp")
        with scratch.open("w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, self.path)


def _fingerprint(request: BatchRequest, mapping: InputMapping) -> str:
    stat = request.input_path.stat()
    what = [
        str(request.input_path),
        stat.st_size,
        stat.st_mtime_ns,
        str(request.input_format),
        request.chunk_rows,
        mapping.as_dict(),
    ]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def run_batch(
    request: BatchRequest,
    scorer: Scorer,
    *,
    on_progress: Callable[[BatchProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchResult:
    """Score the whole file, resuming from the work folder's checkpoint when it has one."""
    signature = scorer.signature
    reader = open_reader(request.input_path, request.input_format, request.chunk_rows)
    mapping = plan_mapping(signature, reader.columns, request.mapping)
    request.work_dir.mkdir(parents=True, exist_ok=True)
    parts_dir = request.work_dir / "parts"
    checkpoint = _Checkpoint(request.work_dir / "checkpoint.json", _fingerprint(request, mapping))
    if checkpoint.fresh:
        shutil.rmtree(parts_dir, ignore_errors=True)
        checkpoint.input_sha256 = file_sha256(request.input_path)
        checkpoint.save()
    parts_dir.mkdir(exist_ok=True)
    resumed_at = checkpoint.chunks_done
    names = output_names([s.name for s in signature.outputs], [c.name for c in reader.columns])
    started, rows_at_start = time.monotonic(), checkpoint.rows_done

    lock = threading.Lock()

    def report() -> None:
        if on_progress is None:
            return
        with lock:
            _report(on_progress, checkpoint, reader.total_rows, started, rows_at_start)

    report()
    errors_seen, first_errors = checkpoint.errors, list(checkpoint.first_errors)

    def commit(
        chunk: Chunk,
        outputs: dict[str, np.ndarray],
        row_errors: list[str | None],
        errors_then: int,
        first_then: list[dict[str, Any]],
    ) -> None:
        """Write the chunk's part durably, then record it (on the writer thread, in order)."""
        write_part(
            fmt=request.input_format,
            chunk=chunk,
            outputs=outputs,
            errors=row_errors,
            names=names,
            parts_dir=parts_dir,
        )
        with lock:
            checkpoint.errors, checkpoint.first_errors = errors_then, first_then
            checkpoint.chunks_done = chunk.index + 1
            checkpoint.rows_done = chunk.start + chunk.rows
            checkpoint.save()

    # Scoring chunk k+1 overlaps writing chunk k; reading runs ahead in its own thread.
    writer = _InOrder()
    try:
        for chunk, feeds in _prefetch(_converted(reader, resumed_at, mapping, signature)):
            if should_stop is not None and should_stop():
                raise BatchCancelled("The job was cancelled.")
            outputs, ok, errors = _score_chunk(scorer, feeds.arrays, feeds.ok, dict(feeds.errors))
            row_errors: list[str | None] = [errors.get(row) for row in range(chunk.rows)]
            for row in sorted(errors)[: max(FIRST_ERRORS_KEPT - len(first_errors), 0)]:
                first_errors.append({"row": chunk.start + row, "error": errors[row]})
            errors_seen += len(errors)
            if 0 <= request.max_errors < errors_seen:
                writer.close()
                raise BatchFailed(
                    f"{errors_seen} rows failed, more than the {request.max_errors} this "
                    f"job allows; the first: {first_errors[0]['error']}",
                    first_errors=list(first_errors),
                )
            full = full_outputs(outputs, ok, chunk.rows)
            writer.put(partial(commit, chunk, full, row_errors, errors_seen, list(first_errors)))
            report()
        writer.close()
    finally:
        writer.abandon()
    report()
    parts = [part_path(parts_dir, i, request.input_format) for i in range(checkpoint.chunks_done)]
    digest = assemble(fmt=request.input_format, parts=parts, out=request.output_path)
    elapsed = time.monotonic() - started
    scored = checkpoint.rows_done - rows_at_start
    return BatchResult(
        rows=checkpoint.rows_done,
        errors=checkpoint.errors,
        first_errors=list(checkpoint.first_errors),
        output_path=request.output_path,
        output_sha256=digest,
        input_sha256=checkpoint.input_sha256,
        seconds=elapsed,
        rows_per_s=scored / elapsed if elapsed > 0 else 0.0,
        mapping=mapping.as_dict(),
        resumed_at_chunk=resumed_at,
    )


def _report(
    on_progress: Callable[[BatchProgress], None],
    checkpoint: _Checkpoint,
    total_rows: int,
    started: float,
    rows_at_start: int,
) -> None:
    elapsed = max(time.monotonic() - started, 1e-9)
    rate = (checkpoint.rows_done - rows_at_start) / elapsed
    left = total_rows - checkpoint.rows_done
    on_progress(
        BatchProgress(
            chunks_done=checkpoint.chunks_done,
            rows_done=checkpoint.rows_done,
            total_rows=total_rows,
            errors=checkpoint.errors,
            rows_per_s=rate,
            eta_s=left / rate if rate > 0 else None,
            first_errors=list(checkpoint.first_errors),
        )
    )


class _InOrder:
    """Runs callables one after another on a thread, at most ``depth`` waiting.

    The first error stops the rest; ``put`` and ``close`` raise it in the caller.
    """

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="batch-write", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stop.is_set():
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # raised again in the caller's thread
                    self._error = exc

    def put(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(job)

    def close(self) -> None:
        """Wait for everything queued; raise the first error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop after the callable running now (the others are dropped)."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=0.1)
            self._thread.join(timeout=0.1)


def _converted(
    reader: Reader, start_chunk: int, mapping: InputMapping, signature: Signature
) -> Iterator[tuple[Chunk, Any]]:
    for chunk in reader.chunks(start_chunk):
        yield chunk, chunk_feeds(chunk, mapping, signature)


def _prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce ``items`` in a thread, ``depth`` ahead, so reading overlaps scoring."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            box.put(("error", exc))

    thread = threading.Thread(target=produce, name="batch-read", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.1)


def _score_chunk(
    scorer: Scorer, arrays: dict[str, np.ndarray], ok: np.ndarray, errors: dict[int, str]
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """Score a chunk's converted rows; rows the model refuses join ``errors``."""
    positions = np.flatnonzero(ok)
    if positions.size == 0:
        return _no_outputs(scorer), ok, errors
    per_request = rows_per_request(scorer.signature, arrays, scorer.max_rows)
    results: list[dict[str, np.ndarray]] = []
    good = np.ones(positions.size, dtype=bool)
    for begin in range(0, positions.size, per_request):
        _bisect(scorer, _rows(arrays, begin, per_request), begin, results, good, errors, positions)
    ok = ok.copy()
    ok[positions[~good]] = False
    return (merge_outputs(results) if results else _no_outputs(scorer)), ok, errors


def _no_outputs(scorer: Scorer) -> dict[str, np.ndarray]:
    """Outputs of zero rows, shaped from the signature (a free dimension taken as 1)."""
    return {
        s.name: np.zeros((0, *(max(d, 1) for d in s.shape[1:])), dtype=s.numpy_dtype)
        for s in scorer.signature.outputs
    }


def _bisect(
    scorer: Scorer,
    part: dict[str, np.ndarray],
    offset: int,
    results: list[dict[str, np.ndarray]],
    good: np.ndarray,
    errors: dict[int, str],
    positions: np.ndarray,
) -> None:
    """Score ``part``; when refused, halve it until each refused row has its own error."""
    rows = next(iter(part.values())).shape[0]
    try:
        results.append(scorer.infer(part))
        return
    except RowsRefused as exc:
        if rows == 1:
            good[offset] = False
            errors[int(positions[offset])] = f"the model refused the row: {exc.message}"
            return
    half = rows // 2
    for begin, end in ((0, half), (half, rows)):
        sub = {name: values[begin:end] for name, values in part.items()}
        _bisect(scorer, sub, offset + begin, results, good, errors, positions)


def progress_dict(progress: BatchProgress) -> dict[str, Any]:
    return asdict(progress)
