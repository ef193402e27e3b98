"""Dynamic batching: merge concurrent requests, run them once in a worker thread, split back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from deployer.serving.errors import BadRequest, Overloaded, ServingError
from deployer.serving.model import Array, ModelRunner
from deployer.serving.stats import ModelStats

# onnxruntime errors raised for inputs that passed our name/type/shape checks are about
# the values (an index out of range, a reshape that does not fit): the caller's fault.
log = logging.getLogger("deployer.serving")

_ORT_REQUEST_ERRORS = (ort_state.InvalidArgument, ort_state.Fail, ort_state.RuntimeException)


# Called on the event loop with the request's outputs, or the exception that failed it.
Done = Callable[[list[Array] | BaseException], None]


class _Pending:
    """One request waiting for, or riding in, a batch."""

    __slots__ = ("cancelled", "done", "enqueued", "feeds", "key", "rows")

    def __init__(self, feeds: dict[str, Array], rows: int, key: Hashable, done: Done) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.done = done
        self.enqueued = time.perf_counter_ns()
        self.cancelled = False


class _BatchResult:
    """What a worker thread hands back for one batch."""

    __slots__ = ("errors", "infer_ns", "input_ns", "outputs")

    def __init__(self) -> None:
        self.outputs: list[Array] | None = None
        # When the joint run failed, each request was retried alone: per-request results.
        self.errors: list[list[Array] | BaseException] | None = None
        self.input_ns = 0
        self.infer_ns = 0


class _NotRowWise(Exception):
    """A merged batch's outputs did not come back with one row per input row."""


def _request_error(exc: BaseException) -> BaseException:
    if isinstance(exc, _ORT_REQUEST_ERRORS):
        return BadRequest(f"inference failed: {exc}")
    return exc


class Engine:
    """Queues requests and dispatches batches to a thread pool, at most `max_inflight` at once."""

    def __init__(
        self,
        runner: ModelRunner,
        stats: ModelStats,
        *,
        max_queue_delay_us: int,
        max_inflight: int,
        max_queue_depth: int = 1024,
    ) -> None:
        self.runner = runner
        self.stats = stats
        self.max_delay_ns = max_queue_delay_us * 1000
        self.max_inflight = max_inflight
        self.max_queue_depth = max_queue_depth
        self.executor = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="infer")
        self._queue: deque[_Pending] = deque()
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def max_batch(self) -> int:
        """Rows per batch; 1 when the model cannot be batched (warm-up may find that out)."""
        runner = self.runner
        return runner.max_batch_size if runner.batchable else 1

    def submit(self, feeds: dict[str, Array]) -> asyncio.Future[list[Array]]:
        """Queue validated feeds; the future resolves to all model outputs for these rows."""
        future: asyncio.Future[list[Array]] = asyncio.get_running_loop().create_future()

        def resolve(outcome: list[Array] | BaseException) -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.submit_callback(feeds, resolve)
        return future

    def submit_callback(self, feeds: dict[str, Array], done: Done) -> _Pending:
        """Queue validated feeds; `done` is called on the loop with the outputs or an error.

        Cheaper than a future on the hot path: no future, no extra loop iteration. Raises
        Overloaded when `max_queue_depth` requests are already waiting. The handle returned
        can be given to `cancel` when the caller goes away.
        """
        if len(self._queue) >= self.max_queue_depth:
            raise Overloaded(
                f"the batch queue is full ({self.max_queue_depth} requests waiting); retry later"
            )
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        runner = self.runner
        if runner.batchable:
            # The key holds every input's shape without its batch axis: only requests of
            # the same shapes and types are merged.
            axes = runner.input_axes
            rows = -1
            parts: list[Hashable] = []
            for spec in runner.inputs:
                array = feeds[spec.name]
                axis = axes[spec.name]
                size = int(array.shape[axis])
                if rows < 0:
                    rows = size
                elif size != rows:
                    raise BadRequest(
                        f"the inputs' batch sizes differ: {spec.name!r} has {size} on its "
                        f"batch axis {axis}, {runner.inputs[0].name!r} has {rows}"
                    )
                parts.append((array.shape[:axis] + array.shape[axis + 1 :], array.dtype.char))
            key: Hashable = tuple(parts)
        else:
            rows, key = 1, None
        pending = _Pending(feeds, rows, key, done)
        self._queue.append(pending)
        self.stats.pending_requests += 1
        self._dispatch()
        return pending

    def cancel(self, pending: _Pending) -> None:
        """Drop a request whose caller went away (a reset stream), if it is still queued."""
        if pending.cancelled:
            return
        pending.cancelled = True
        try:
            self._queue.remove(pending)
        except ValueError:
            return  # already running: its answer is dropped by the caller
        self.stats.pending_requests -= 1

    def _dispatch(self) -> None:
        queue = self._queue
        while queue and self._inflight < self.max_inflight:
            head = queue[0]
            if self.max_delay_ns and self.max_batch > 1:
                queued_rows = sum(p.rows for p in queue if p.key == head.key)
                wait = head.enqueued + self.max_delay_ns - time.perf_counter_ns()
                if queued_rows < self.max_batch and wait > 0:
                    if self._timer is None and self._loop is not None:
                        self._timer = self._loop.call_later(wait / 1e9, self._on_timer)
                    return
            batch = self._take_batch()
            self._start(batch)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_batch(self) -> list[_Pending]:
        queue = self._queue
        head = queue.popleft()
        batch = [head]
        if self.max_batch <= 1 or head.rows >= self.max_batch:
            return batch
        rows = head.rows
        skipped: list[_Pending] = []
        while queue and rows < self.max_batch:
            item = queue.popleft()
            if item.key == head.key and rows + item.rows <= self.max_batch:
                batch.append(item)
                rows += item.rows
            else:
                skipped.append(item)
                if len(skipped) > 64:
                    break
        if skipped:
            queue.extendleft(reversed(skipped))
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        self._inflight += 1
        now = time.perf_counter_ns()
        for pending in batch:
            self.stats.queue.add(now - pending.enqueued)
        self.stats.pending_requests -= len(batch)
        work = self._loop.run_in_executor(self.executor, self._execute, batch)
        work.add_done_callback(lambda done: self._finish(batch, done))

    def _execute(self, batch: list[_Pending]) -> _BatchResult:
        """Runs in a worker thread: concatenate, run, and isolate failures."""
        result = _BatchResult()
        start = time.perf_counter_ns()
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            axes = self.runner.input_axes
            feeds = {
                name: np.concatenate([p.feeds[name] for p in batch], axis=axes[name])
                for name in batch[0].feeds
            }
        result.input_ns = time.perf_counter_ns() - start
        try:
            result.outputs, result.infer_ns = self.runner.run(feeds)
            if len(batch) > 1 and not self._splittable(result.outputs, batch):
                raise _NotRowWise
        except Exception as exc:
            if len(batch) == 1:
                result.errors = [_request_error(exc)]
                return result
            # One bad request must not fail its batch-mates, and outputs that do not
            # have one row per input row cannot be split: run each alone.
            result.errors = []
            for pending in batch:
                try:
                    outputs, infer_ns = self.runner.run(pending.feeds)
                    result.infer_ns += infer_ns
                    result.errors.append(outputs)
                except Exception as single_exc:
                    result.errors.append(_request_error(single_exc))
        return result

    def _splittable(self, outputs: list[Array], batch: list[_Pending]) -> bool:
        rows = sum(p.rows for p in batch)
        return all(
            out.ndim > axis and out.shape[axis] == rows
            for out, axis in zip(outputs, self.runner.output_axes, strict=True)
        )

    def _finish(self, batch: list[_Pending], done: asyncio.Future[_BatchResult]) -> None:
        self._inflight -= 1
        start = time.perf_counter_ns()
        try:
            result = done.result()
        except BaseException as exc:  # the pool itself failed (shut down): fail everyone
            for pending in batch:
                _deliver(pending, ServingError(f"inference failed: {exc}"))
            self._dispatch()
            return
        rows = sum(p.rows for p in batch)
        if result.errors is not None:
            for pending, outcome in zip(batch, result.errors, strict=True):
                _deliver(pending, outcome)
        elif len(batch) == 1:
            _deliver(batch[0], result.outputs or [])
        else:
            outputs = result.outputs or []
            axes = self.runner.output_axes
            offset = 0
            for pending in batch:
                end = offset + pending.rows
                _deliver(
                    pending,
                    [
                        _rows_of(out, axis, offset, end)
                        for out, axis in zip(outputs, axes, strict=True)
                    ],
                )
                offset = end
        self.stats.record_batch(
            rows, len(batch), result.input_ns, result.infer_ns, time.perf_counter_ns() - start
        )
        self._dispatch()

    def shutdown(self) -> None:
        """Stop the worker threads once running batches are done."""
        if self._timer is not None:
            self._timer.cancel()
        self.executor.shutdown(wait=True, cancel_futures=False)

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._queue) or self._inflight > 0


def _rows_of(array: Array, axis: int, start: int, end: int) -> Array:
    """Rows start..end of a batched output along its batch axis (contiguous, for encoding)."""
    if axis == 0:
        return array[start:end]
    return np.ascontiguousarray(array[(slice(None),) * axis + (slice(start, end),)])


def _deliver(pending: _Pending, outcome: list[Array] | BaseException) -> None:
    try:
        pending.done(outcome)
    except Exception:  # one caller's failure must not stop the others' answers
        log.exception(
            "error while delivering an inference result", extra={"event": "internal_error"}
        )
