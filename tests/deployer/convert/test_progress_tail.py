"""The conversion's progress file is tailed while the job appends to it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from deployer.convert.runner import StepEvent, _ProgressTail


def test_progress_reader_loses_no_line_written_in_pieces(tmp_path: Path) -> None:
    """A writer appends lines in two pieces while the reader polls: each line arrives once,
    whole and in order."""
    path = tmp_path / "progress.jsonl"
    path.touch()
    seen: list[StepEvent] = []
    tail = _ProgressTail(path, seen.append)
    count = 1500
    done = threading.Event()

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for index in range(count):
                text = json.dumps({"step": f"s{index}", "duration_ms": index, "message": "m" * 40})
                middle = len(text) // 2
                os.write(fd, text[:middle].encode())
                time.sleep(0)  # let the reader see half a line
                os.write(fd, (text[middle:] + "\n").encode())
        finally:
            os.close(fd)
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        tail.poll()
    writer.join()
    tail.poll()
    steps = [event.step for event in seen]
    lost = count - len(set(steps))
    print(f"\n{len(steps)} of {count} progress lines relayed, {lost} lost")
    assert steps == [f"s{index}" for index in range(count)]


def test_progress_reader_waits_for_the_end_of_a_line(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    seen: list[StepEvent] = []
    tail = _ProgressTail(path, seen.append)
    tail.poll()  # no file yet: nothing, no error
    line = json.dumps({"step": "load", "duration_ms": 1.5, "message": "Loaded"})
    path.write_text(line[:10])
    tail.poll()
    assert seen == []
    with path.open("a") as handle:
        handle.write(line[10:] + "\n")
    tail.poll()
    tail.poll()
    assert [(event.step, event.duration_ms) for event in seen] == [("load", 1.5)]
