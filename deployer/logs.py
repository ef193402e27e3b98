"""Following an instance's log file: its last lines, then every line written after.

The deploy worker copies each container's output into a file (local instances write
their own), so whoever follows a log needs only that file, never the Docker engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 64 * 1024
# Terminal control sequences (colours, cursor moves) that libraries write to stderr.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """The text without terminal colour codes and other control sequences."""
    return _ANSI.sub("", text)


def failure_cause(text: str) -> str:
    """The message of the last error an instance logged (its JSON lines), or ""."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and str(entry.get("level", "")).lower() in (
            "error",
            "critical",
        ):
            return " ".join(str(entry.get("msg", "")).split())
    return ""


def tail_lines(path: Path, count: int = 200) -> str:
    """The last ``count`` lines of a text file ("" when it cannot be read)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=count))
    except OSError:
        return ""


class LogFollower:
    """One follower's place in a log file: its last lines first, then each complete line
    appended after. ``read`` never waits, so a thread or an event loop can drive it.

    A file that does not exist yet is waited for; a file that is replaced or truncated
    (a log rotated, an instance restarted) is read again from its start.
    """

    def __init__(self, path: Path, *, tail: int = 200) -> None:
        self.path, self.tail = path, tail
        self._handle: BinaryIO | None = None
        self._inode = -1
        self._pending = b""

    @property
    def opened(self) -> bool:
        """Whether the file is open; the first read of an unopened one reads its tail
        (a whole file after a rotation), so an event loop should hand it to a thread."""
        return self._handle is not None

    def read(self) -> list[str]:
        """The lines available now ([] when nothing new has arrived)."""
        if self._handle is None:
            try:
                self._handle = self.path.open("rb")
            except OSError:
                return []
            self._inode = os.fstat(self._handle.fileno()).st_ino
            last = deque(self._handle, maxlen=self.tail + 1) if self.tail > 0 else deque()
            if last and not last[-1].endswith(b"\n"):
                self._pending = last.pop()  # a line still being written
            if len(last) > self.tail:
                last.popleft()
            if self.tail <= 0:
                self._handle.seek(0, 2)
            if last:
                return list(_decode(last))
        data = self._handle.read(CHUNK)
        if data:
            lines = (self._pending + data).split(b"\n")
            self._pending = lines.pop()
            return list(_decode(line + b"\n" for line in lines))
        if _replaced(self.path, self._inode, self._handle.tell()):
            self._handle.close()
            self._handle, self._pending, self.tail = None, b"", 10**9  # all of the new file
            return self.read()
        return []

    def rest(self) -> list[str]:
        """A last line still without its newline, when the follower stops."""
        if not self._pending:
            return []
        rest, self._pending = self._pending, b""
        return [rest.decode("utf-8", errors="replace") + "\n"]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def follow_file(
    path: Path,
    *,
    tail: int = 200,
    keep_going: Callable[[], bool],
    poll_s: float = 0.25,
) -> Iterator[str]:
    """Yield the last ``tail`` lines of ``path``, then each complete line appended to it,
    until ``keep_going()`` says no (asked whenever nothing new has arrived)."""
    follower = LogFollower(path, tail=tail)
    try:
        while True:
            lines = follower.read()
            if lines:
                yield from lines
                continue
            if not keep_going():
                yield from follower.rest()
                return
            time.sleep(poll_s)
    finally:
        follower.close()


async def follow_file_async(
    path: Path,
    *,
    tail: int = 200,
    keep_going: Callable[[], Awaitable[bool]],
    poll_s: float = 0.25,
) -> AsyncIterator[str]:
    """``follow_file`` for an event loop: waiting holds no thread, so a web server can
    serve many followers at once."""
    follower = LogFollower(path, tail=tail)
    try:
        while True:
            if follower.opened:
                lines = follower.read()  # at most one chunk: quick enough for the loop
            else:
                lines = await asyncio.to_thread(follower.read)
            if lines:
                for line in lines:
                    yield line
                continue
            if not await keep_going():
                for line in follower.rest():
                    yield line
                return
            await asyncio.sleep(poll_s)
    finally:
        follower.close()


def _decode(lines: Iterable[bytes]) -> Iterator[str]:
    for line in lines:
        yield line.decode("utf-8", errors="replace")


def _replaced(path: Path, inode: int, position: int) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False  # gone for now: keep what we have, look again later
    return stat.st_ino != inode or stat.st_size < position
