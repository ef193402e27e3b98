"""The async-inference spool: requests accepted with ``Prefer: respond-async``, kept on disk.

One folder per deployment (``<data dir>/async/d<id>/``, outside any instance, so a killed
or replaced instance loses nothing) holds one file per request, and the folder a file is
in is its state::

    pending/<id>.req   accepted by an instance (written to a temporary file, fsynced,
                       renamed; answered 202 only after that)
    claimed/<id>.req   taken by a dispatcher (a rename, so two never take the same one);
                       its mtime is the dispatcher's lease, renewed while it works
    done/<id>.res      the answer (status, headers, body), written the same durable way
    outbox/<id>.json   a callback still to be delivered, with its attempts

A file is one JSON line of metadata, then the body bytes. Ids are 32 lower-case hex
digits (128 random bits) and are checked before any path is built, so an id from a URL
can never name another file. Both the runtime (accept, answer polls) and the portal's
dispatcher (claim, complete, expire) use this module; it imports nothing of either.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ID_RE = re.compile(r"[0-9a-f]{32}")
PENDING, CLAIMED, DONE, OUTBOX = "pending", "claimed", "done", "outbox"
# Request headers that travel with the body to the synchronous call.
FORWARDED_HEADERS = ("content-type", "inference-header-content-length", "content-encoding")
# Written into files the runtime and the portal both read: a container's user and the
# portal share the folder's group (README "Async inference").
FILE_MODE = 0o660
DIR_MODE = 0o2770


class SpoolError(Exception):
    """The spool cannot take or give a request (full disk, bad file); the message says why."""


class QueueFull(SpoolError):
    """The deployment's queue holds its maximum of accepted requests."""


@dataclass(frozen=True)
class AsyncRequest:
    """One accepted request: its id, when, by which key, what to call and where to answer."""

    id: str
    accepted_at: float
    model_name: str
    key_id: str | None
    headers: dict[str, str]
    callback_url: str
    body: bytes = b""

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "accepted_at": self.accepted_at,
            "model_name": self.model_name,
            "key_id": self.key_id,
            "headers": self.headers,
            "callback_url": self.callback_url,
        }


@dataclass(frozen=True)
class AsyncResult:
    """The answer to an async request, as the synchronous call gave it."""

    id: str
    status: int
    headers: dict[str, str]
    completed_at: float
    key_id: str | None
    attempts: int = 1
    body: bytes = b""

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "headers": self.headers,
            "completed_at": self.completed_at,
            "key_id": self.key_id,
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class QueueStats:
    """What the deployment page shows: requests waiting or running, and the oldest's age."""

    depth: int = 0
    oldest_age_s: float | None = None
    results: int = 0
    callbacks_pending: int = 0


@dataclass
class Lookup:
    """What a poll finds: ``state`` is pending, running, done or unknown."""

    state: str
    result: AsyncResult | None = None
    key_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def valid_id(value: str) -> bool:
    """Whether ``value`` is a well-formed request id (checked before any path is built)."""
    return ID_RE.fullmatch(value) is not None


def _write_durably(path: Path, meta: dict[str, Any], body: bytes) -> None:
    """Write a file whole or not at all: temporary file, fsync, rename, fsync the folder."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    line, _, body = data.partition(b"\n")
    meta = json.loads(line)
    if not isinstance(meta, dict):
        raise ValueError(f"{path.name}: metadata is not an object")
    return meta, body


def _count(folder: Path) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for entry in entries if not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


class Spool:
    """One deployment's spool folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, state: str) -> Path:
        return self.root / state

    def ensure(self) -> None:
        """Create the folders (group-writable, set-gid: the instance and the portal share them)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, *(self.folder(s) for s in (PENDING, CLAIMED, DONE, OUTBOX))):
            folder.mkdir(exist_ok=True)
            os.chmod(folder, DIR_MODE)

    # ---------------------------------------------------------------- runtime side
    def depth(self) -> int:
        """Requests accepted and not yet answered (waiting or being called)."""
        return _count(self.folder(PENDING)) + _count(self.folder(CLAIMED))

    def submit(
        self,
        *,
        body: bytes,
        model_name: str,
        key_id: str | None,
        headers: dict[str, str],
        callback_url: str,
        max_depth: int,
    ) -> AsyncRequest:
        """Store a request durably and return it; QueueFull past ``max_depth``."""
        if self.depth() >= max_depth:
            raise QueueFull(f"the async queue of this deployment is full ({max_depth} requests)")
        request = AsyncRequest(
            id=secrets.token_hex(16),
            accepted_at=time.time(),
            model_name=model_name,
            key_id=key_id,
            headers=headers,
            callback_url=callback_url,
        )
        try:
            _write_durably(self.folder(PENDING) / f"{request.id}.req", request.meta(), body)
        except OSError as exc:
            raise SpoolError(f"the async spool cannot store the request: {exc.strerror}") from exc
        return request

    def lookup(self, request_id: str) -> Lookup:
        """Where one request is; ``unknown`` for a malformed, unknown or expired id."""
        if not valid_id(request_id):
            return Lookup("unknown")
        done = self.folder(DONE) / f"{request_id}.res"
        try:
            meta, body = _read(done)
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            return Lookup("unknown")
        else:
            result = _result(meta, body)
            return Lookup("done", result=result, key_id=result.key_id)
        for state, name in ((PENDING, "pending"), (CLAIMED, "running")):
            path = self.folder(state) / f"{request_id}.req"
            try:
                with path.open("rb") as handle:
                    meta = json.loads(handle.readline())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                return Lookup("unknown")
            return Lookup(name, key_id=meta.get("key_id"), extra=meta)
        # Between two renames (claimed -> done) a request can be in neither place for a
        # moment: look at done once more before calling it unknown.
        if done.exists():
            return self.lookup(request_id)
        return Lookup("unknown")

    # ---------------------------------------------------------------- dispatcher side
    def pending_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` waiting requests, oldest first."""
        found: list[tuple[float, str]] = []
        try:
            with os.scandir(self.folder(PENDING)) as entries:
                for entry in entries:
                    name = entry.name
                    if name.endswith(".req") and valid_id(name[:-4]):
                        with contextlib.suppress(FileNotFoundError):
                            found.append((entry.stat().st_mtime, name[:-4]))
        except FileNotFoundError:
            return []
        found.sort()
        return [request_id for _, request_id in found[:limit]]

    def claim(self, request_id: str) -> AsyncRequest | None:
        """Take one waiting request (None when another dispatcher took it first)."""
        source = self.folder(PENDING) / f"{request_id}.req"
        target = self.folder(CLAIMED) / f"{request_id}.req"
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return None
        os.utime(target)  # the lease starts now
        try:
            meta, body = _read(target)
        except (OSError, ValueError):
            target.unlink(missing_ok=True)  # a file this module never wrote whole
            return None
        return AsyncRequest(
            id=request_id,
            accepted_at=float(meta.get("accepted_at", 0.0)),
            model_name=str(meta.get("model_name", "")),
            key_id=meta.get("key_id"),
            headers={str(k): str(v) for k, v in dict(meta.get("headers") or {}).items()},
            callback_url=str(meta.get("callback_url") or ""),
            body=body,
        )

    def renew(self, request_id: str) -> None:
        """Renew the lease on a claimed request this dispatcher still works on."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.folder(CLAIMED) / f"{request_id}.req")

    def release_stale(self, lease_s: float) -> int:
        """Hand back claimed requests whose dispatcher stopped renewing them (killed)."""
        released = 0
        now = time.time()
        for request_id, mtime in self._entries(CLAIMED, ".req"):
            if now - mtime <= lease_s:
                continue
            claimed = self.folder(CLAIMED) / f"{request_id}.req"
            if (self.folder(DONE) / f"{request_id}.res").exists():
                claimed.unlink(missing_ok=True)  # answered just before its dispatcher died
                continue
            with contextlib.suppress(FileNotFoundError):
                os.rename(claimed, self.folder(PENDING) / f"{request_id}.req")
                released += 1
        return released

    def complete(self, request: AsyncRequest, result: AsyncResult) -> None:
        """Store the answer durably (and the callback to send), then drop the request."""
        if request.callback_url:
            outbox = {"id": request.id, "url": request.callback_url, "attempts": 0, "next_at": 0}
            _write_durably(self.folder(OUTBOX) / f"{request.id}.json", outbox, b"")
        _write_durably(self.folder(DONE) / f"{request.id}.res", result.meta(), result.body)
        (self.folder(CLAIMED) / f"{request.id}.req").unlink(missing_ok=True)

    def result(self, request_id: str) -> AsyncResult | None:
        """The stored answer, if there is one."""
        if not valid_id(request_id):
            return None
        try:
            meta, body = _read(self.folder(DONE) / f"{request_id}.res")
        except (OSError, ValueError):
            return None
        return _result(meta, body)

    def outbox(self) -> Iterator[dict[str, Any]]:
        """Callbacks still to deliver."""
        for request_id, _ in self._entries(OUTBOX, ".json"):
            with contextlib.suppress(OSError, ValueError):
                meta, _body = _read(self.folder(OUTBOX) / f"{request_id}.json")
                yield meta

    def outbox_update(self, entry: dict[str, Any]) -> None:
        _write_durably(self.folder(OUTBOX) / f"{entry['id']}.json", entry, b"")

    def outbox_remove(self, request_id: str) -> None:
        (self.folder(OUTBOX) / f"{request_id}.json").unlink(missing_ok=True)

    def expire(self, ttl_s: float) -> int:
        """Remove answers older than ``ttl_s`` (and callbacks that still wait for them)."""
        removed = 0
        now = time.time()
        for request_id, mtime in self._entries(DONE, ".res"):
            if now - mtime > ttl_s:
                (self.folder(DONE) / f"{request_id}.res").unlink(missing_ok=True)
                self.outbox_remove(request_id)
                removed += 1
        return removed

    def stats(self) -> QueueStats:
        """Queue depth and the age of the oldest waiting or running request."""
        oldest: float | None = None
        # Pending first, then claimed: a request claimed in between is listed twice and
        # counted once.
        seen: set[str] = set()
        for state in (PENDING, CLAIMED):
            for request_id, _mtime in self._entries(state, ".req"):
                if request_id in seen:
                    continue
                seen.add(request_id)
                accepted = self._accepted_at(state, request_id)
                if accepted is not None and (oldest is None or accepted < oldest):
                    oldest = accepted
        return QueueStats(
            depth=len(seen),
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest),
            results=_count(self.folder(DONE)),
            callbacks_pending=_count(self.folder(OUTBOX)),
        )

    def accepted_at(self, request_id: str) -> float:
        """When a waiting request was accepted (its file's time if it cannot be read)."""
        found = self._accepted_at(PENDING, request_id)
        if found is not None:
            return found
        try:
            return (self.folder(PENDING) / f"{request_id}.req").stat().st_mtime
        except OSError:
            return time.time()

    def _accepted_at(self, state: str, request_id: str) -> float | None:
        try:
            with (self.folder(state) / f"{request_id}.req").open("rb") as handle:
                return float(json.loads(handle.readline()).get("accepted_at"))
        except (OSError, ValueError, TypeError):
            return None

    def _entries(self, state: str, suffix: str) -> Iterator[tuple[str, float]]:
        try:
            with os.scandir(self.folder(state)) as entries:
                listed = [(entry.name, entry) for entry in entries]
        except FileNotFoundError:
            return
        for name, entry in listed:
            if not name.endswith(suffix) or not valid_id(name[: -len(suffix)]):
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            yield name[: -len(suffix)], mtime


def _result(meta: dict[str, Any], body: bytes) -> AsyncResult:
    return AsyncResult(
        id=str(meta.get("id", "")),
        status=int(meta.get("status", 500)),
        headers={str(k): str(v) for k, v in dict(meta.get("headers") or {}).items()},
        completed_at=float(meta.get("completed_at", 0.0)),
        key_id=meta.get("key_id"),
        attempts=int(meta.get("attempts", 1)),
        body=body,
    )
