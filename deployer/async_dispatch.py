"""The async dispatcher: runs spooled requests through their deployment and delivers answers.

It claims requests from each deployment's spool (a rename; :mod:`deployer.serving.async_spool`),
calls the deployment synchronously through its address, retrying with back-off while the
instance is down or being replaced, stores the answer durably in the spool, and POSTs it
to the request's callback URL, signed (README "Async inference"), retried with back-off,
only to allowed hosts. A killed dispatcher loses nothing: its claims stop being renewed
and go back to the queue after the lease, and an inference has no side effect, so running
one twice is harmless (the answer is stored once, by rename).

The portal supplies the deployments (``Target``s) from its rows; this module never
imports Django.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from deployer.serving.async_headers import check_callback_url
from deployer.serving.async_spool import AsyncRequest, AsyncResult, Spool

log = logging.getLogger("deployer.async_dispatch")

# Answers of the edge or the runtime that mean "not now": the instance is gone, being
# replaced, warming up, or its batch queue is full.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
SIGNATURE_HEADER = "ModelPort-Signature"
TIMESTAMP_HEADER = "ModelPort-Timestamp"
REQUEST_ID_HEADER = "ModelPort-Request-Id"
STATUS_HEADER = "ModelPort-Status"


@dataclass(frozen=True)
class Target:
    """One deployment as the dispatcher needs it."""

    deployment_id: int
    spool_dir: Path
    # Where to POST the inference now (None while the deployment has no live instance).
    infer_url: str | None
    headers: dict[str, str] = field(default_factory=dict)
    # The team's callback signing secret.
    callback_secret: bytes = b""


@dataclass(frozen=True)
class DispatchSettings:
    """The dispatcher's limits and timings (portal settings ``MODELPORT_ASYNC_*``)."""

    concurrency: int = 4
    lease_s: float = 30.0
    result_ttl_s: float = 3600.0
    max_wait_s: float = 3600.0
    request_timeout_s: float = 300.0
    retry_max_s: float = 10.0
    callback_hosts: frozenset[str] = frozenset()
    callback_attempts: int = 10
    callback_timeout_s: float = 10.0
    callback_retry_max_s: float = 300.0
    poll_s: float = 0.05
    targets_every_s: float = 1.0


def sign(secret: bytes, timestamp: str, request_id: str, body: bytes) -> str:
    """The callback signature: ``v1=`` and the HMAC-SHA256 of ``<timestamp>.<id>.<body>``."""
    message = timestamp.encode() + b"." + request_id.encode() + b"." + body
    return "v1=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(secret: bytes, headers: dict[str, str], body: bytes, *, max_age_s: float = 300) -> bool:
    """What a receiver does (the tests use it): the signature matches and is recent."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    request_id = lowered.get(REQUEST_ID_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(given, sign(secret, timestamp, request_id, body))


class Dispatcher:
    """Claims, runs and answers async requests of every deployment ``targets()`` returns."""

    def __init__(
        self,
        targets: Callable[[], list[Target]],
        settings: DispatchSettings,
    ) -> None:
        self.targets_source = targets
        self.settings = settings
        self.targets: dict[int, Target] = {}
        self._targets_at = 0.0
        self._lock = threading.Lock()
        self._running: dict[tuple[int, str], Future[None]] = {}
        self._callbacks: dict[tuple[int, str], Future[None]] = {}
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="async-infer")
        self._callback_pool = ThreadPoolExecutor(
            max(2, settings.concurrency // 2), thread_name_prefix="async-callback"
        )
        self._local = threading.local()
        self._stop = threading.Event()
        # Set when a call ends, so a free slot is filled at once rather than at the next poll.
        self._wake = threading.Event()
        self._housekeeping_at = 0.0
        self._renewed_at = 0.0
        self.completed = 0
        self.delivered = 0

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        """Work until ``stop()``."""
        log.info("async dispatcher started", extra={"concurrency": self.settings.concurrency})
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("async dispatcher pass failed; trying again")
                busy = False
            if not busy:
                self._wake.wait(self.settings.poll_s)
            self._wake.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._callback_pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run_once(self) -> bool:
        """One pass over every spool; True when it started work."""
        now = time.monotonic()
        if now - self._targets_at >= self.settings.targets_every_s or not self.targets:
            self.targets = {t.deployment_id: t for t in self.targets_source()}
            self._targets_at = now
        self._reap()
        if now - self._renewed_at >= min(1.0, self.settings.lease_s / 3):
            self._renewed_at = now
            for deployment_id, request_id in list(self._running):
                target = self.targets.get(deployment_id)
                if target is not None:
                    Spool(target.spool_dir).renew(request_id)
        housekeeping = now - self._housekeeping_at >= 1.0
        if housekeeping:
            self._housekeeping_at = now
        started = False
        for target in list(self.targets.values()):
            spool = Spool(target.spool_dir)
            if housekeeping:
                spool.release_stale(self.settings.lease_s)
                spool.expire(self.settings.result_ttl_s)
                self._deliver_due(target, spool)
            if target.infer_url is None:
                if housekeeping:
                    self._give_up_waiting(target, spool)
                continue
            free = self.settings.concurrency - len(self._running)
            if free <= 0:
                continue
            for request_id in spool.pending_ids(free):
                request = spool.claim(request_id)
                if request is None:
                    continue
                key = (target.deployment_id, request_id)
                future = self._pool.submit(self._process, target.deployment_id, request)
                future.add_done_callback(lambda _: self._wake.set())
                self._running[key] = future
                started = True
        return started

    def _give_up_waiting(self, target: Target, spool: Spool) -> None:
        """A deployment with no instance (stopped, failed): requests that waited past
        ``max_wait_s`` get a stored 504, as they would while being retried."""
        limit = time.time() - self.settings.max_wait_s
        for request_id in spool.pending_ids(100):
            if spool.accepted_at(request_id) > limit:
                break  # oldest first: the rest are younger
            request = spool.claim(request_id)
            if request is not None:
                self._store(
                    target,
                    request,
                    504,
                    {"content-type": "application/json"},
                    b'{"error":"the deployment has no serving instance"}',
                    0,
                )

    def _reap(self) -> None:
        for table in (self._running, self._callbacks):
            for key, future in list(table.items()):
                if future.done():
                    del table[key]
                    exc = future.exception()
                    if exc is not None:
                        log.error("async work %s failed: %s", key, exc, exc_info=exc)

    # ---------------------------------------------------------------- inference
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # a proxy from the environment never sees the keys
            self._local.session = session
        return session

    def _process(self, deployment_id: int, request: AsyncRequest) -> None:
        """Call the deployment until it gives a final answer (or the wait runs out); store it."""
        settings = self.settings
        delay = 0.1
        attempts = 0
        while not self._stop.is_set():
            target = self.targets.get(deployment_id)
            if target is None:
                return  # deleted: its spool goes with it
            waited = time.time() - request.accepted_at
            if waited > settings.max_wait_s:
                self._store(
                    target,
                    request,
                    504,
                    {"content-type": "application/json"},
                    b'{"error":"the deployment did not answer within %d s"}'
                    % int(settings.max_wait_s),
                    attempts,
                )
                return
            if target.infer_url is not None:
                attempts += 1
                outcome = self._call(target, request)
                if outcome is not None:
                    status, headers, body = outcome
                    self._store(target, request, status, headers, body, attempts)
                    return
            self._stop.wait(delay)
            delay = min(delay * 2, settings.retry_max_s)

    def _call(
        self, target: Target, request: AsyncRequest
    ) -> tuple[int, dict[str, str], bytes] | None:
        """One synchronous call; None when it should be tried again later."""
        headers = {**request.headers, **target.headers}
        try:
            response = self._session().post(
                target.infer_url or "",
                data=request.body,
                headers=headers,
                timeout=(5.0, self.settings.request_timeout_s),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            log.info("async %s: deployment unreachable (%s); retrying", request.id, exc)
            return None
        if response.status_code in TRANSIENT_STATUSES:
            return None
        kept = {
            name: response.headers[name]
            for name in ("content-type", "inference-header-content-length")
            if name in response.headers
        }
        return response.status_code, kept, response.content

    def _store(
        self,
        target: Target,
        request: AsyncRequest,
        status: int,
        headers: dict[str, str],
        body: bytes,
        attempts: int,
    ) -> None:
        result = AsyncResult(
            id=request.id,
            status=status,
            headers=headers,
            completed_at=time.time(),
            key_id=request.key_id,
            attempts=attempts,
            body=body,
        )
        Spool(target.spool_dir).complete(request, result)
        with self._lock:
            self.completed += 1

    # ---------------------------------------------------------------- callbacks
    def _deliver_due(self, target: Target, spool: Spool) -> None:
        now = time.time()
        for entry in spool.outbox():
            key = (target.deployment_id, str(entry["id"]))
            if key in self._callbacks or float(entry.get("next_at", 0)) > now:
                continue
            result = spool.result(str(entry["id"]))
            if result is None:
                continue  # not stored yet (or expired: expire() removes the entry)
            self._callbacks[key] = self._callback_pool.submit(
                self._deliver, target, spool, entry, result
            )

    def _deliver(
        self, target: Target, spool: Spool, entry: dict[str, Any], result: AsyncResult
    ) -> None:
        """POST one answer to its callback URL; on failure, schedule the next attempt."""
        settings = self.settings
        url = str(entry["url"])
        attempts = int(entry.get("attempts", 0)) + 1
        problem = check_callback_url(url, settings.callback_hosts)
        error = ""
        if problem is None:
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": result.headers.get("content-type", "application/json"),
                REQUEST_ID_HEADER: result.id,
                STATUS_HEADER: str(result.status),
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(target.callback_secret, timestamp, result.id, result.body),
            }
            if "inference-header-content-length" in result.headers:
                headers["Inference-Header-Content-Length"] = result.headers[
                    "inference-header-content-length"
                ]
            try:
                response = self._session().post(
                    url,
                    data=result.body,
                    headers=headers,
                    timeout=settings.callback_timeout_s,
                    allow_redirects=False,
                )
                if 200 <= response.status_code < 300:
                    spool.outbox_remove(result.id)
                    with self._lock:
                        self.delivered += 1
                    return
                error = f"the receiver answered {response.status_code}"
            except requests.RequestException as exc:
                error = f"cannot reach the receiver: {type(exc).__name__}"
        else:
            error = problem
            attempts = settings.callback_attempts  # no retry makes a refused host allowed
        if attempts >= settings.callback_attempts:
            log.warning("async %s: callback to %s given up: %s", result.id, url, error)
            spool.outbox_remove(result.id)
            return
        entry = {
            **entry,
            "attempts": attempts,
            "error": error,
            "next_at": time.time() + min(2.0**attempts * 0.5, settings.callback_retry_max_s),
        }
        spool.outbox_update(entry)
