"""``make run``'s supervisor: what it says at start-up, where gunicorn keeps its files,
and that stopping it stops the log shipper at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from deployer.proxy import find_nginx
from portal import stack
from tests.conftest import REPO, free_port, require


def test_startup_says_docker_and_nginx_were_chosen_and_why(
    docker_engine: None, settings: Any
) -> None:
    require("nginx", bool(find_nginx()), "apt-get install nginx (make test does)")
    settings.MODELPORT_RUNTIME, settings.MODELPORT_PROXY = "auto", "auto"
    runtime, proxy = stack.startup_choices("http://127.0.0.1:8080")
    assert runtime.startswith(
        "Runtime: Docker containers (MODELPORT_RUNTIME=auto and a Docker engine answers: Docker "
    ), runtime
    assert proxy.startswith(
        f"Proxy: nginx at http://127.0.0.1:8080 (MODELPORT_PROXY=auto and nginx is installed "
        f"at {find_nginx()})"
    ), proxy


def test_startup_says_why_it_fell_back_to_local_processes_and_direct_urls(
    settings: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings.MODELPORT_RUNTIME, settings.MODELPORT_PROXY = "auto", "none"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    runtime, proxy = stack.startup_choices("")
    assert runtime.startswith(
        "Runtime: local processes (MODELPORT_RUNTIME=auto and no Docker engine answers: "
        "The Docker engine does not answer"
    ), runtime
    assert proxy.startswith("Proxy: none (MODELPORT_PROXY=none)"), proxy
    settings.MODELPORT_RUNTIME = "local"
    assert stack.startup_choices("")[0] == "Runtime: local processes (MODELPORT_RUNTIME=local)."


def test_without_a_proxy_the_banner_says_whether_the_address_survives_a_rollout(
    settings: Any,
) -> None:
    """Local processes hand their listening sockets on (the address stays); without that
    hand-over, or with Docker containers, each instance has its own port."""
    settings.MODELPORT_RUNTIME, settings.MODELPORT_PROXY = "local", "none"
    settings.MODELPORT_LOCAL_HANDOVER = True
    proxy = stack.startup_choices("")[1]
    assert "stays the same across rollouts and rollbacks" in proxy, proxy
    assert "changes" not in proxy
    settings.MODELPORT_LOCAL_HANDOVER = False
    proxy = stack.startup_choices("")[1]
    assert proxy.endswith("which changes with every rollout."), proxy


def test_readme_curl_calls_the_stable_address_and_names_the_serving_network() -> None:
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    curls = [n for n, line in enumerate(lines) if "curl" in line and "/v2/models/" in line]
    assert curls, "the README has no curl example of an inference call"
    for n in curls:
        # The stable address: the proxy's port, then team, model and deployment; and the
        # deployment's key, since deployments are private by default.
        assert "http://127.0.0.1:8080/TEAM/MODEL/DEPLOYMENT/v2/models/" in lines[n], lines[n]
        assert "Authorization: Bearer $KEY" in "\n".join(lines[n : n + 3]), lines[n]
    assert "Docker's default `bridge` network" in readme
    assert "`MODELPORT_DOCKER_NETWORK`" in readme


def test_gunicorn_keeps_its_control_socket_and_heartbeats_in_the_data_dir(
    tmp_path: Path,
) -> None:
    """The real web command from the supervisor, run with a private HOME: the control
    socket appears under <data dir>/run/, and nothing under ~/.gunicorn/."""
    home, data_dir = tmp_path / "home", tmp_path / "var"
    home.mkdir()
    services = stack._services({}, data_dir, f"127.0.0.1:{free_port()}", None)
    [web] = [s for s in services if s.name == "web"]
    env = {**os.environ, "HOME": str(home), "DJANGO_SETTINGS_MODULE": "portal.settings_test"}
    process = subprocess.Popen(
        web.command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        socket_path = data_dir / "run" / "gunicorn.ctl"
        deadline = time.monotonic() + 30
        while not socket_path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert socket_path.is_socket(), f"no control socket at {socket_path}"
        assert not (home / ".gunicorn").exists()
        assert web.command[web.command.index("--worker-tmp-dir") + 1] == str(data_dir / "run")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)


def test_a_data_dir_too_deep_for_a_socket_gets_no_socket_rather_than_one_elsewhere(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 100)
    files = stack._gunicorn_files(deep)
    assert "--no-control-socket" in files
    assert "--control-socket" not in files
    assert files[files.index("--worker-tmp-dir") + 1] == str(deep / "run")


def _shipper_pid(log_dir: Path) -> int:
    return int(json.loads((log_dir / "shipper.pid").read_text())["pid"])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_stopping_the_stack_stops_the_log_shipper_within_two_seconds(
    docker_engine: None, settings: Any
) -> None:
    """A real shipper process, started as the deploy worker starts it (its own session,
    so Ctrl-C never reaches it); the supervisor's stop path ends it promptly."""
    from portal.core import engine

    runtime = engine.docker_runtime()
    runtime.ensure_log_shipper()
    pid = _shipper_pid(runtime.settings.log_dir)
    time.sleep(1.0)  # let it reach its loop (signal handlers installed, engine connected)
    assert _alive(pid)
    started = time.monotonic()
    stack._stop_serving_instances({})
    took = time.monotonic() - started
    assert not _alive(pid), "the log shipper outlived the stop"
    assert took < 5, f"stopping took {took:.1f} s"
    assert not (runtime.settings.log_dir / "shipper.pid").exists()
    assert runtime.stop_log_shipper() is False  # nothing left to stop
