"""Inference keys files: which keys a serving instance accepts (written by the portal).

The serving runtime reads the file given with ``--keys-file`` and re-reads it when
it changes, so a new or revoked key takes effect within a second, with no restart.
The portal writes one file per deployment; every write is atomic (a temporary file
renamed into place), so a reader never sees half a file. Only SHA-256 hashes of the
keys are written, never the keys themselves.

Format (version 1)::

    {"version": 1, "public": false,
     "keys": [{"id": "k_12", "sha256": "<hex>", "expires_at": 1767225600,
               "rate_per_s": 5.0, "burst": 10}]}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError

KEYS_FILE_VERSION = 1
# Where a container sees its deployment's keys folder (bind-mounted read-only).
CONTAINER_KEYS_DIR = "/modelport-keys"
KEYS_FILE_NAME = "keys.json"


class KeysFileError(DeployerError):
    """A keys file cannot be written or read back."""


def key_sha256(key: str) -> str:
    """The hex SHA-256 of a full key string, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    """One accepted key: its id (logged with each request), hash, expiry and rate limit."""

    id: str
    sha256: str
    expires_at: int | None = None
    rate_per_s: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 64:
            raise KeysFileError(f"A key id must be 1-64 characters, not {self.id!r}.")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise KeysFileError(f"Key {self.id}: sha256 must be 64 lower-case hex digits.")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise KeysFileError(f"Key {self.id}: rate_per_s must be positive.")
        if self.burst is not None and self.burst < 1:
            raise KeysFileError(f"Key {self.id}: burst must be at least 1.")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sha256": self.sha256,
            "expires_at": self.expires_at,
            "rate_per_s": self.rate_per_s,
            "burst": self.burst,
        }


@dataclass(frozen=True)
class KeySet:
    """Everything one deployment's instances need to decide who may call them."""

    public: bool = False
    keys: tuple[KeyEntry, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": KEYS_FILE_VERSION,
            "public": self.public,
            "keys": [key.to_json() for key in sorted(self.keys, key=lambda k: k.id)],
        }

    @classmethod
    def from_json(cls, data: Any) -> KeySet:
        """Parse a keys file's content; a bad file fails with what is wrong."""
        if not isinstance(data, dict) or data.get("version") != KEYS_FILE_VERSION:
            raise KeysFileError(
                f"A keys file must be a JSON object with version {KEYS_FILE_VERSION}."
            )
        keys = data.get("keys", [])
        if not isinstance(data.get("public", False), bool) or not isinstance(keys, list):
            raise KeysFileError("A keys file needs a boolean 'public' and a list 'keys'.")
        entries = []
        for item in keys:
            if not isinstance(item, dict):
                raise KeysFileError("Every entry of 'keys' must be an object.")
            entries.append(
                KeyEntry(
                    id=str(item.get("id", "")),
                    sha256=str(item.get("sha256", "")),
                    expires_at=None if item.get("expires_at") is None else int(item["expires_at"]),
                    rate_per_s=None
                    if item.get("rate_per_s") is None
                    else float(item["rate_per_s"]),
                    burst=None if item.get("burst") is None else int(item["burst"]),
                )
            )
        return cls(public=bool(data.get("public", False)), keys=tuple(entries))


def write_keys_file(path: Path, keys: KeySet) -> bool:
    """Write ``keys`` to ``path`` atomically; return whether the content changed.

    The folder and file are world-readable (a container's unprivileged user reads
    them through a read-only bind mount); they hold hashes only.
    """
    content = json.dumps(keys.to_json(), indent=1, sort_keys=True) + "\n"
    try:
        if path.read_text() == content:
            return False
    except OSError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise KeysFileError(f"The keys file {path} could not be written: {exc}") from exc
    return True


def read_keys_file(path: Path) -> KeySet:
    """Read a keys file back (the portal's checks and the tests)."""
    try:
        return KeySet.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise KeysFileError(f"The keys file {path} cannot be read: {exc}") from exc
