"""API token and inference key formats and hashing: shown once, stored only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "mp_"  # noqa: S105 - a marker that makes tokens recognisable, not a secret


def token_generate() -> tuple[str, str, str]:
    """A new token: (the token itself, its display prefix, its hash)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token[:10], token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


INFERENCE_KEY_PREFIX = "mpk_"


def inference_key_generate() -> tuple[str, str, str]:
    """A new inference key: (the key itself, its display prefix, its SHA-256)."""
    key = INFERENCE_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key[:12], token_hash(key)
