"""API keys: the keys file, its reloading, and each key's token bucket (README "Keys")."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from deployer.serving.errors import RateLimited, Unauthorized

log = logging.getLogger("deployer.serving")

# How often the file's mtime and size are looked at: a revocation lands within ~1-2 s.
RELOAD_CHECK_S = 1.0
# A refused call looks again sooner (a key created, or a deployment made public, a moment
# ago works at once), at most this often, so a flood of bad calls costs one stat() each.
UNKNOWN_RECHECK_S = 0.05


class KeysFileError(ValueError):
    """The keys file is not the documented JSON; the message names what is wrong."""


@dataclass
class Key:
    """One accepted key: its id, the sha256 of the full key string, and its limits."""

    id: str
    digest: bytes
    expires_at: float | None
    rate_per_s: float | None
    burst: int | None
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class KeySet:
    """One parsed version of the keys file."""

    public: bool
    keys: tuple[Key, ...]


def _number(value: object, where: str, *, integer: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KeysFileError(f"{where}: expected a number or null, got {value!r}")
    if integer and not float(value).is_integer():
        raise KeysFileError(f"{where}: expected an integer, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise KeysFileError(f"{where}: must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_keys(text: str) -> KeySet:
    """Parse the keys file `{"version": 1, "public": bool, "keys": [...]}`."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise KeysFileError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise KeysFileError("must hold a JSON object")
    if doc.get("version") != 1:
        raise KeysFileError(f"version: expected 1, got {doc.get('version')!r}")
    public = doc.get("public", False)
    if not isinstance(public, bool):
        raise KeysFileError(f"public: expected true or false, got {public!r}")
    entries = doc.get("keys", [])
    if not isinstance(entries, list):
        raise KeysFileError("keys: expected a list")
    keys: list[Key] = []
    for index, entry in enumerate(entries):
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected an object")
        key_id = entry.get("id")
        digest = entry.get("sha256")
        if not isinstance(key_id, str) or not key_id:
            raise KeysFileError(f"{where}.id: expected a non-empty string")
        if not isinstance(digest, str) or len(digest) != 64:
            raise KeysFileError(f"{where}.sha256: expected 64 hex digits")
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise KeysFileError(f"{where}.sha256: expected 64 hex digits") from None
        rate = _number(entry.get("rate_per_s"), f"{where}.rate_per_s")
        burst = _number(entry.get("burst"), f"{where}.burst", integer=True)
        key = Key(
            id=key_id,
            digest=raw,
            expires_at=_number(entry.get("expires_at"), f"{where}.expires_at"),
            rate_per_s=rate,
            burst=None if burst is None else int(burst),
        )
        key.tokens = _capacity(key)
        keys.append(key)
    return KeySet(public=public, keys=tuple(keys))


def _capacity(key: Key) -> float:
    if key.burst is not None:
        return float(max(key.burst, 1))
    return max(1.0, key.rate_per_s or 1.0)


class KeyChecker:
    """Checks a presented key against the keys file, re-reading it when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: KeySet | None = None  # None: never read a good file: refuse everything
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._reload(force=True)

    def _reload(self, *, force: bool = False, every_s: float = RELOAD_CHECK_S) -> None:
        now = time.monotonic()
        if not force and now - self._checked < every_s:
            return
        self._checked = now
        try:
            info = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None or force:
                log.error("keys file unreadable: %s", exc, extra={"event": "keys_file_unreadable"})
                self._stamp = None
            return
        # The portal renames a new file into place: a new inode, whatever the clock says.
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            fresh = parse_keys(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeError, KeysFileError) as exc:
            kept = "keeping the last good version" if self.keys else "refusing all inference"
            log.error(
                "keys file %s is bad (%s); %s",
                self.path,
                exc,
                kept,
                extra={"event": "keys_file_invalid"},
            )
            return
        if self.keys is not None:  # keep the buckets of keys that stay
            old = {k.id: k for k in self.keys.keys}
            for key in fresh.keys:
                previous = old.get(key.id)
                if previous is not None:
                    key.tokens = min(previous.tokens, key.tokens)
                    key.refilled = previous.refilled
        self.keys = fresh
        log.info(
            "keys file loaded",
            extra={"event": "keys_loaded", "keys": len(fresh.keys), "public": fresh.public},
        )

    def check(self, authorization: str | None) -> str | None:
        """The id of the key `authorization` carries (None: the deployment is public); raise
        Unauthorized or RateLimited unless it is usable."""
        self._reload()
        keys = self.keys
        try:
            return _check(keys, authorization)
        except Unauthorized:
            # Refused by what was read last: look at the file again now (at most every
            # 50 ms), so a key just created, or a deployment just made public, works at once.
            self._reload(every_s=UNKNOWN_RECHECK_S)
            if self.keys is keys:
                raise
            return _check(self.keys, authorization)


def _check(keys: KeySet | None, authorization: str | None) -> str | None:
    if keys is None:
        raise Unauthorized("keys file missing or invalid: no request can be authorized")
    if keys.public:
        return None
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <key>")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization must be 'Bearer <key>'")
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    found = _find(keys, digest)
    if found is None:
        raise Unauthorized("unknown key")
    if found.expires_at is not None and time.time() >= found.expires_at:
        raise Unauthorized(f"key {found.id} has expired")
    if found.rate_per_s is not None:
        _take_token(found)
    return found.id


def _find(keys: KeySet, digest: bytes) -> Key | None:
    found: Key | None = None
    for key in keys.keys:  # every key is compared, so the time does not say which matched
        if hmac.compare_digest(key.digest, digest):
            found = key
    return found


def _take_token(key: Key) -> None:
    rate = key.rate_per_s or 0.0
    now = time.monotonic()
    capacity = _capacity(key)
    key.tokens = min(capacity, key.tokens + (now - key.refilled) * rate)
    key.refilled = now
    if key.tokens >= 1.0:
        key.tokens -= 1.0
        return
    wait = math.inf if rate <= 0 else (1.0 - key.tokens) / rate
    retry = 60 if not math.isfinite(wait) else max(1, math.ceil(wait))
    raise RateLimited(f"key {key.id} is over its rate of {rate:g} requests/s", retry)
