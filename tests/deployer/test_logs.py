"""Following a log file: the tail, then new lines, across a rotation, until told to stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from deployer.logs import follow_file


def test_tail_then_new_lines_then_a_replaced_file(tmp_path: Path) -> None:
    log = tmp_path / "instance.log"
    log.write_text("one\ntwo\nthree\nfour\nhalf")
    stop = threading.Event()
    seen: list[str] = []

    def writer() -> None:
        time.sleep(0.3)
        with log.open("a") as handle:
            handle.write(" a line\nfive\n")
        time.sleep(0.3)
        log.with_name("new.log").write_text("after restart\n")
        log.with_name("new.log").replace(log)  # rotated: a new file under the same name
        time.sleep(0.5)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    for line in follow_file(log, tail=2, keep_going=lambda: not stop.is_set(), poll_s=0.02):
        seen.append(line)
    thread.join()
    # The unfinished last line is held back until it is complete.
    assert seen == ["three\n", "four\n", "half a line\n", "five\n", "after restart\n"]


def test_a_file_that_does_not_exist_yet_is_waited_for(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    deadline = time.monotonic() + 0.5
    threading.Timer(0.1, lambda: log.write_text("hello\n")).start()
    seen = list(follow_file(log, tail=10, keep_going=lambda: time.monotonic() < deadline))
    assert seen == ["hello\n"]


def test_stops_when_told(tmp_path: Path) -> None:
    log = tmp_path / "quiet.log"
    log.write_text("x\n")
    started = time.monotonic()
    assert list(follow_file(log, tail=5, keep_going=lambda: False)) == ["x\n"]
    assert time.monotonic() - started < 1


def test_async_follower_reads_the_tail_then_new_lines_then_the_unfinished_one(
    tmp_path: Path,
) -> None:
    import asyncio
    import concurrent.futures

    from deployer.logs import follow_file_async

    log = tmp_path / "instance.log"
    log.write_text("one\ntwo\nthree\n")

    async def follow() -> list[str]:
        polls = 0

        async def keep_going() -> bool:
            nonlocal polls
            polls += 1
            if polls == 1:
                with log.open("a") as handle:
                    handle.write("four\nfi")
            return polls < 3

        return [
            line
            async for line in follow_file_async(log, tail=2, keep_going=keep_going, poll_s=0.01)
        ]

    # A loop of its own in a thread: the browser tests leave one running in this thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lines = pool.submit(asyncio.run, follow()).result(timeout=30)
    assert lines == ["two\n", "three\n", "four\n", "fi\n"]
