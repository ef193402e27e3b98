"""Headers of async inference: ``Prefer`` (RFC 7240) and the callback URL's checks."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MAX_CALLBACK_URL = 2048


def parse_prefer(values: list[str]) -> dict[str, str]:
    """The preferences of ``Prefer`` header values (RFC 7240 section 2), lower-cased names.

    ``preference = token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )``: a value is
    a token or a quoted string; parameters after ``;`` are read past and ignored. Each
    comma-separated element is one preference; the first occurrence of a name wins
    (section 2). Raises ValueError naming the problem for a malformed element.
    """
    found: dict[str, str] = {}
    for value in values:
        for element in _split_outside_quotes(value, ","):
            element = element.strip()
            if not element:
                continue
            head = _split_outside_quotes(element, ";")[0].strip()
            name, eq, raw = head.partition("=")
            name = name.strip().lower()
            if not name or not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"Prefer: {element!r} does not start with a preference name")
            word = raw.strip()
            if eq and word.startswith('"'):
                if len(word) < 2 or not word.endswith('"'):
                    raise ValueError(f"Prefer: unterminated quoted value in {element!r}")
                word = re.sub(r"\\(.)", r"\1", word[1:-1])
            elif eq and word and not _TOKEN_RE.fullmatch(word):
                raise ValueError(f"Prefer: {word!r} is not a token or a quoted string")
            found.setdefault(name, word)
    return found


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def check_callback_url(url: str, allowed_hosts: frozenset[str] | None) -> str | None:
    """Why ``url`` cannot be a callback (None when it can). ``allowed_hosts`` holds host
    names or ``host:port``; None skips the allow-list (the dispatcher checks it again)."""
    if len(url) > MAX_CALLBACK_URL:
        return f"the callback URL is longer than {MAX_CALLBACK_URL} characters"
    if any(ord(char) < 33 or ord(char) > 126 for char in url):
        return "the callback URL holds spaces or characters outside printable ASCII"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"the callback URL is malformed: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the callback URL must be an absolute http:// or https:// URL"
    if parts.username is not None or parts.password is not None:
        return "the callback URL must not hold a user name or password"
    if allowed_hosts is not None:
        host = parts.hostname.lower()
        with_port = f"{host}:{port or (443 if parts.scheme == 'https' else 80)}"
        if host not in allowed_hosts and with_port not in allowed_hosts:
            return f"callbacks to {host} are not allowed on this installation"
    return None
