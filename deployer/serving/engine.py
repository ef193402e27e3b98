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

from deployer.serving.errors import BadRequest, ServingError
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

    __slots__ = ("done", "enqueued", "feeds", "key", "rows")

    def __init__(self, feeds: dict[str, Array], rows: int, key: Hashable, done: Done) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.done = done
        self.enqueued = time.perf_counter_ns()


class _BatchResult:
    """What a worker thread hands back for one batch."""

    __slots__ = ("errors", "infer_ns", "input_ns", "outputs")

    def __init__(self) -> None:
        self.outputs: list[Array] | None = None
        # When the joint run failed, each request was retried alone: per-request results.
        self.errors: list[list[Array] | BaseException] | None = None
        self.input_ns = 0
        self.infer_ns = 0


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
    ) -> None:
        self.runner = runner
        self.stats = stats
        self.max_delay_ns = max_queue_delay_us * 1000
        self.max_inflight = max_inflight
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

    def submit_callback(self, feeds: dict[str, Array], done: Done) -> None:
        """Queue validated feeds; `done` is called on the loop with the outputs or an error.

        Cheaper than a future on the hot path: no future, no extra loop iteration.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self.runner.batchable:
            first = next(iter(feeds.values()))
            rows = int(first.shape[0])
            if len(feeds) == 1:
                key: Hashable = (first.shape[1:], first.dtype.char)
            else:
                if any(int(a.shape[0]) != rows for a in feeds.values()):
                    raise BadRequest("all inputs must have the same batch size (first dimension)")
                key = tuple((a.shape[1:], a.dtype.char) for a in feeds.values())
        else:
            rows, key = 1, None
        self._queue.append(_Pending(feeds, rows, key, done))
        self.stats.pending_requests += 1
        self._dispatch()

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
            feeds = {
                name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds
            }
        result.input_ns = time.perf_counter_ns() - start
        try:
            result.outputs, result.infer_ns = self.runner.run(feeds)
        except Exception as exc:
            if len(batch) == 1:
                result.errors = [_request_error(exc)]
                return result
            # One bad request must not fail its batch-mates: run each alone.
            result.errors = []
            for pending in batch:
                try:
                    outputs, infer_ns = self.runner.run(pending.feeds)
                    result.infer_ns += infer_ns
                    result.errors.append(outputs)
                except Exception as single_exc:
                    result.errors.append(_request_error(single_exc))
        return result

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
            offset = 0
            for pending in batch:
                end = offset + pending.rows
                _deliver(pending, [out[offset:end] for out in outputs])
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


def _deliver(pending: _Pending, outcome: list[Array] | BaseException) -> None:
    try:
        pending.done(outcome)
    except Exception:  # one caller's failure must not stop the others' answers
        log.exception(
            "error while delivering an inference result", extra={"event": "internal_error"}
        )
