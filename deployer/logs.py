"""Following an instance's log file: its last lines, then every line written after.

The deploy worker copies each container's output into a file (local instances write
their own), so whoever follows a log needs only that file, never the Docker engine.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 64 * 1024


def tail_lines(path: Path, count: int = 200) -> str:
    """The last ``count`` lines of a text file ("" when it cannot be read)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=count))
    except OSError:
        return ""


def follow_file(
    path: Path,
    *,
    tail: int = 200,
    keep_going: Callable[[], bool],
    poll_s: float = 0.25,
) -> Iterator[str]:
    """Yield the last ``tail`` lines of ``path``, then each complete line appended to it,
    until ``keep_going()`` says no (asked whenever nothing new has arrived).

    A file that does not exist yet is waited for; a file that is replaced or truncated
    (a log rotated, an instance restarted) is read again from its start.
    """
    handle = None
    inode = -1
    pending = b""
    try:
        while True:
            if handle is None:
                try:
                    handle = path.open("rb")
                except OSError:
                    if not keep_going():
                        return
                    time.sleep(poll_s)
                    continue
                inode = os.fstat(handle.fileno()).st_ino
                last = deque(handle, maxlen=tail + 1) if tail > 0 else deque()
                if last and not last[-1].endswith(b"\n"):
                    pending = last.pop()  # a line still being written
                if len(last) > tail:
                    last.popleft()
                yield from _decode(last)
                if tail <= 0:
                    handle.seek(0, 2)
            data = handle.read(CHUNK)
            if data:
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                yield from _decode(line + b"\n" for line in lines)
                continue
            if _replaced(path, inode, handle.tell()):
                handle.close()
                handle, pending, tail = None, b"", 10**9  # all of the new file
                continue
            if not keep_going():
                if pending:
                    yield pending.decode("utf-8", errors="replace") + "\n"
                return
            time.sleep(poll_s)
    finally:
        if handle is not None:
            handle.close()


def _decode(lines: Iterator[bytes] | deque[bytes]) -> Iterator[str]:
    for line in lines:
        yield line.decode("utf-8", errors="replace")


def _replaced(path: Path, inode: int, position: int) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False  # gone for now: keep what we have, look again later
    return stat.st_ino != inode or stat.st_size < position
