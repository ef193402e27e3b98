"""Following a deployment's log holds no web thread: the real web server (as ``make run``
starts it) serves 50 followers while pages load as fast as without them."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connection
from django.test import Client

from portal import stack
from portal.core import engine
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry.models import Model
from tests.conftest import REPO, Personas, free_port, wait_for
from tests.portal.factories import ready_version, running_deployment

FOLLOWERS = 50
PAGE_LOADS = 30


def _web_command(env: dict[str, str], data_dir: Path, bind: str) -> list[str]:
    (web,) = [s for s in stack._services(env, data_dir, bind, None) if s.name == "web"]
    return web.command


def _timed_loads(session: requests.Session, urls: list[str]) -> list[float]:
    seconds = []
    for index in range(PAGE_LOADS):
        url = urls[index % len(urls)]
        started = time.monotonic()
        response = session.get(url, timeout=30)
        seconds.append(time.monotonic() - started)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
    return seconds


class Follower(threading.Thread):
    """One ``logs?follow=true`` client on a real connection, keeping every line it gets."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.lines: list[str] = []
        self.error = ""
        self.response: requests.Response | None = None

    def run(self) -> None:
        try:
            with requests.get(
                self.url,
                params={"follow": "true", "tail": 2, "seconds": 120},
                headers={"Authorization": f"Token {self.token}", "Accept": "text/plain"},
                stream=True,
                timeout=(10, 60),
            ) as response:
                self.response = response
                if response.status_code != 200:
                    self.error = f"HTTP {response.status_code}"
                    return
                for line in response.iter_lines(decode_unicode=True):
                    self.lines.append(line)
        except (requests.RequestException, AttributeError, ValueError) as exc:
            # Closing the response from the test thread ends the read with one of these.
            self.error = self.error or type(exc).__name__

    def stop(self) -> None:
        if self.response is not None:
            self.response.close()


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.e2e
def test_fifty_followers_do_not_slow_page_loads(
    worker_env: dict[str, str], personas: Personas, onnx_file: Path, settings: Any, tmp_path: Path
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    deployment = running_deployment(ready_version(model, 1, onnx_file))
    revision = deployment.current_revision
    assert revision is not None
    # A container's log as the deploy worker's shipper writes it: following needs only
    # the file, never the engine.
    revision.handle, revision.runtime = "f0110" * 12 + "abcd", "docker"
    revision.save(update_fields=["handle", "runtime"])
    log = engine.instance_log_file(revision)
    assert log is not None
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("started\nready\n")

    browser = Client()
    browser.force_login(personas.bob.user)
    session = requests.Session()
    session.cookies.set("sessionid", browser.cookies["sessionid"].value)
    session.headers["Authorization"] = f"Token {personas.bob.token}"

    bind = f"127.0.0.1:{free_port()}"
    base = f"http://{bind}"
    command = _web_command(worker_env, Path(settings.DATA_DIR), bind)
    server_log = tmp_path / "web.log"
    server = subprocess.Popen(
        command,
        cwd=REPO,
        env=worker_env,
        stdout=server_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    followers: list[Follower] = []
    writing = threading.Event()
    try:
        pages = [f"{base}/deployments/{deployment.pk}/", f"{base}/api/v1/deployments/"]
        wait_for(
            lambda: _answers(session, pages[1]),
            timeout_s=60,
            what=f"the web server ({' '.join(command[:4])}):\n{server_log}",
        )
        _timed_loads(session, pages)  # warm both workers
        alone = _timed_loads(session, pages)

        follow_url = f"{base}/api/v1/deployments/{deployment.pk}/logs"
        followers = [Follower(follow_url, personas.vera.token) for _ in range(FOLLOWERS)]
        for follower in followers:
            follower.start()
        wait_for(
            lambda: all(f.lines or f.error for f in followers),
            timeout_s=60,
            what="every follower to get the log's tail",
        )
        errors = [f.error for f in followers if f.error]
        assert not errors, errors[:5]

        def write_lines() -> None:
            with log.open("a") as handle:
                for index in range(1000):
                    if writing.wait(0.1):
                        return
                    handle.write(f"line {index}\n")
                    handle.flush()

        writer = threading.Thread(target=write_lines, daemon=True)
        writer.start()
        followed = _timed_loads(session, pages)
        time.sleep(1.0)  # the last lines reach every follower
        writing.set()
        writer.join()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            (db_connections,) = cursor.fetchone()
        got_new = sum(1 for f in followers if any(line.startswith("line ") for line in f.lines))
        still_open = sum(1 for f in followers if f.is_alive())

        p50_alone, p50_followed = statistics.median(alone), statistics.median(followed)
        print(
            f"\npage loads without followers: p50 {p50_alone * 1000:.1f} ms, p95 "
            f"{_p(alone, 0.95) * 1000:.1f} ms; with {FOLLOWERS} followers: p50 "
            f"{p50_followed * 1000:.1f} ms, p95 {_p(followed, 0.95) * 1000:.1f} ms; "
            f"ratio p50 {p50_followed / p50_alone:.2f}; {got_new}/{FOLLOWERS} followers "
            f"received the new lines, {still_open} still connected; {db_connections} "
            "database connections open"
        )
        assert got_new == FOLLOWERS
        assert still_open == FOLLOWERS
        assert db_connections < FOLLOWERS // 2, "followers hold database connections"
        assert p50_followed < max(0.5, 5 * p50_alone)
        assert max(followed) < 5.0

        # The streams end by themselves when the instance stops being the deployment's.
        Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.STOPPED)
        stopped = time.monotonic()
        wait_for(
            lambda: not any(f.is_alive() for f in followers),
            timeout_s=15,
            what="the followers' streams to end once the deployment stopped",
        )
        print(f"all {FOLLOWERS} streams ended {time.monotonic() - stopped:.1f} s after the stop")
    finally:
        writing.set()
        for follower in followers:
            follower.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _answers(session: requests.Session, url: str) -> bool:
    try:
        return session.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False
