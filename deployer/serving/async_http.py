"""Async inference over REST: ``Prefer: respond-async`` (RFC 7240) on the infer route.

An accepted request is checked as a synchronous one would be (key, size caps, the body
decoded against the model), stored durably in the deployment's spool
(:mod:`deployer.serving.async_spool`) and answered ``202 Accepted`` with a ``Location``
to poll; the portal's dispatcher runs it later through the deployment's stable address,
so nothing accepted depends on this instance staying alive. ``GET`` on the Location
answers the stored V2 response when done, 202 while waiting, 404 when unknown or expired.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from deployer.serving.async_headers import check_callback_url, parse_prefer
from deployer.serving.async_spool import QueueFull, Spool, SpoolError
from deployer.serving.codec import decode_infer_request, dumps
from deployer.serving.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServingError,
    Unavailable,
)

if TYPE_CHECKING:
    from deployer.serving.app import ServingApp
    from deployer.serving.http import HttpConnection, _Slot

CALLBACK_HEADER = "modelport-callback-url"
# How soon a poller is told to come back, in seconds.
POLL_AFTER_S = 1
# Spool writes in flight at once (each holds its body); past it, 503 with Retry-After.
MAX_WRITES = 64


class QueueFullError(RateLimited):
    """The async queue is full (HTTP 429 with Retry-After, as a key over its rate)."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message, retry_after_s)


class AsyncFront:
    """The async routes of one serving process."""

    def __init__(self, app: ServingApp) -> None:
        config = app.config
        self.app = app
        self.spool = Spool(Path(config.async_dir))
        self.max_queue = config.async_max_queue
        hosts = [h.strip().lower() for h in config.async_callback_hosts.split(",")]
        self.callback_hosts = frozenset(h for h in hosts if h)
        self.writing = 0

    @staticmethod
    def wants_async(prefer: list[str]) -> bool:
        """Whether the Prefer header values ask for respond-async (BadRequest if malformed)."""
        if not prefer:
            return False
        try:
            return "respond-async" in parse_prefer(prefer)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def submit(
        self,
        conn: HttpConnection,
        slot: _Slot,
        body: bytes,
        headers: dict[str, str],
        path: str,
        max_body_bytes: int,
    ) -> None:
        """Check the request, spool it off the event loop, answer 202 (or why not)."""
        app = self.app
        app.check_can_infer()
        callback = headers.pop(CALLBACK_HEADER, "")
        if callback:
            if not self.callback_hosts:
                raise BadRequest("callbacks are not enabled on this installation")
            problem = check_callback_url(callback, self.callback_hosts)
            if problem:
                raise BadRequest(problem)
        decoded = _decompressed(body, headers.get("content-encoding", ""), max_body_bytes)
        length: int | None = None
        if "inference-header-content-length" in headers:
            try:
                length = int(headers["inference-header-content-length"])
            except ValueError:
                raise BadRequest("Inference-Header-Content-Length is not a number") from None
        decode_infer_request(app.model, decoded, length)  # refuse now what would fail later
        if self.writing >= MAX_WRITES:
            raise Overloaded(f"{MAX_WRITES} async requests are being stored; retry later")
        location = _location(path)
        key_id = slot.key

        def store() -> str:
            return self.spool.submit(
                body=body,
                model_name=app.config.model_name,
                key_id=key_id,
                headers=headers,
                callback_url=callback,
                max_depth=self.max_queue,
            ).id

        def stored(future: asyncio.Future[str]) -> None:
            self.writing -= 1
            try:
                request_id = future.result()
            except QueueFull as exc:
                conn._reply_error(slot, QueueFullError(str(exc)))
                return
            except SpoolError as exc:  # a full disk, say: the caller may try again
                conn._reply_error(slot, Unavailable(str(exc)))
                return
            except Exception as exc:
                conn.server.log_exception(exc)
                conn._reply_error(slot, ServingError(f"internal error: {type(exc).__name__}"))
                return
            answer = dumps({"id": request_id, "status": "pending"})
            conn.reply(
                slot,
                202,
                answer,
                extra=b"location: %s%s\r\npreference-applied: respond-async\r\n"
                b"retry-after: %d\r\n" % (location.encode(), request_id.encode(), POLL_AFTER_S),
            )

        self.writing += 1
        future = asyncio.get_running_loop().run_in_executor(None, store)
        future.add_done_callback(stored)

    def poll(self, conn: HttpConnection, slot: _Slot, request_id: str) -> None:
        """GET .../async/{id}: the stored answer, 202 while waiting, 404 when unknown."""
        found = self.spool.lookup(request_id)
        # The key that sent it (or the portal's) may read it; a key of the same team
        # that did not send it learns nothing, not even that the id exists.
        if found.state == "unknown" or (
            found.key_id is not None and slot.key not in (found.key_id, "portal")
        ):
            raise NotFound(f"no async request {request_id!r} (unknown, or expired)")
        if found.state != "done" or found.result is None:
            conn.reply(
                slot,
                202,
                dumps({"id": request_id, "status": found.state}),
                extra=b"retry-after: %d\r\n" % POLL_AFTER_S,
            )
            return
        result = found.result
        content_type = result.headers.get("content-type", "application/json").encode("latin-1")
        header_length = result.headers.get("inference-header-content-length")
        conn.reply(
            slot,
            result.status,
            result.body,
            content_type=content_type,
            header_length=int(header_length) if header_length else None,
        )


def _location(path: str) -> str:
    """A reference relative to the request's URL that resolves to ``.../v2/models/{m}/async/``:
    it stays right behind a proxy that serves the deployment under a prefix of its own."""
    return "../../async/" if "/versions/" in path else "async/"


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if not encoding or encoding == "identity":
        return body
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"cannot decompress the body: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body is over the limit of {limit} bytes")
    return data
