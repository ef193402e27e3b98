"""A paced V2 inference load: N threads with keep-alive sessions at a fixed total rate.

Every request is counted: a failure is any answer that is not HTTP 200 with an
output, or any transport error (reset, refused, timeout). The answers' first output
value tells which model version served each request.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests


@dataclass
class LoadResult:
    """What a load run saw."""

    sent: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    answers: Counter[float] = field(default_factory=Counter)
    seconds: float = 0.0
    # (time since start, first output value) of every successful request, in order.
    timeline: list[tuple[float, float]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


class Load:
    """Send ``rate`` requests per second to ``url`` until stopped."""

    def __init__(self, url: str, body: dict[str, object], *, rate: float, threads: int = 6) -> None:
        self.url, self.body = url, body
        self.interval = threads / rate
        self.threads = threads
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.result = LoadResult()
        self.workers: list[threading.Thread] = []
        self.started = 0.0

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for index in range(self.threads):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self.workers.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.workers:
            thread.join(timeout=30)
        self.result.seconds = time.monotonic() - self.started

    def _run(self, index: int) -> None:
        session = requests.Session()
        next_at = time.monotonic() + index * self.interval / self.threads
        while not self.stop_event.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += self.interval
            failure, value = "", None
            try:
                response = session.post(self.url, json=self.body, timeout=10)
                if response.status_code == 200:
                    value = float(response.json()["outputs"][0]["data"][0])
                else:
                    failure = f"HTTP {response.status_code}: {response.text[:200]}"
            except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
                failure = f"{type(exc).__name__}: {exc}"[:300]
            with self.lock:
                self.result.sent += 1
                if value is not None:
                    self.result.ok += 1
                    self.result.answers[round(value, 4)] += 1
                    self.result.timeline.append((time.monotonic() - self.started, value))
                else:
                    self.result.failures.append(failure)
