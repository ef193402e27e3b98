"""JSON-lines logging to stderr: one object per line for events and for each request."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

# LogRecord attributes that are not user-supplied `extra` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def utc_timestamp(now: float | None = None) -> str:
    """ISO 8601 UTC timestamp with milliseconds."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Send the runtime's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLog:
    """Buffers one JSON line per request and writes them to stderr in batches.

    Writing per request would cost a system call each; flushing every few milliseconds
    (or when the buffer fills) keeps the log cheap under load.
    """

    def __init__(self, enabled: bool, fd: int = 2, flush_interval_s: float = 0.05) -> None:
        self.enabled = enabled
        self._fd = fd
        self._lines: list[str] = []
        self._interval = flush_interval_s
        self._handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""
        self._quoted: dict[str, str] = {}

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        return f"{self._second_text}.{int(now % 1 * 1000):03d}Z"

    def record(
        self,
        *,
        protocol: str,
        method: str,
        path: str,
        status: int,
        duration_s: float,
        bytes_in: int,
        bytes_out: int,
        peer: str,
        error: str | None = None,
        key: str | None = None,
    ) -> None:
        """Queue one access-log line (``key``: the id of the key the request was let in
        with; the portal reads it back for each key's last use)."""
        if not self.enabled:
            return
        now = time.time()
        # Formatted by hand: json.dumps of a dict per request cost more than the rest of
        # the line. Only the path and the error can hold characters that need escaping.
        quoted = self._quoted.get(path)
        if quoted is None:
            quoted = json.dumps(path)
            if len(self._quoted) < 1024:
                self._quoted[path] = quoted
        line = (
            f'{{"ts":"{self._timestamp(now)}","level":"info","logger":"deployer.serving.access",'
            f'"protocol":"{protocol}","method":"{method}","path":{quoted},"status":{status},'
            f'"duration_ms":{duration_s * 1000:.3f},"bytes_in":{bytes_in},'
            f'"bytes_out":{bytes_out},"peer":"{peer}"'
        )
        if error is not None:
            line += f',"error":{json.dumps(error)}'
        if key is not None:
            line += f',"key":{json.dumps(key)}'
        self._lines.append(line + "}")
        if len(self._lines) >= 512:
            self.flush()
        elif self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._handle = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Write out what is buffered."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode()
        self._lines.clear()
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except BlockingIOError:
            pass
        except OSError:
            self.enabled = False
