"""Shared fixtures: personas, API clients, real services (worker, broker, MLflow)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(service: str, available: bool, how: str = "") -> None:
    """Skip without the service locally; in CI a missing service fails the test."""
    if available:
        return
    message = f"{service} is not available{': ' + how if how else ''}"
    if IN_CI:
        pytest.fail(f"{message} (required in CI)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the private data directory that portal.settings_test made for this run."""
    data_dir = os.environ.get("MODELPORT_DATA_DIR", "")
    if os.path.basename(data_dir).startswith("modelport-test-"):
        _stop_local_instances(Path(data_dir))
        shutil.rmtree(data_dir, ignore_errors=True)


def _stop_local_instances(data_dir: Path) -> None:
    from deployer.runtimes.local import LocalProcessRuntime

    state = data_dir / "runtime" / "local"
    if state.is_dir():
        runtime = LocalProcessRuntime(state)
        for instance in runtime.owned():
            runtime.stop(instance.handle, grace_s=1)
    _stop_containers_and_proxy(data_dir)


def _stop_containers_and_proxy(data_dir: Path) -> None:
    """Remove this run's containers (by its installation label) and stop its nginx."""
    from deployer.proxy import NginxProxy

    installation = data_dir / "installation_id"
    if (data_dir / "runtime" / "docker").is_dir() and installation.is_file():
        from deployer.errors import DeployerError
        from deployer.runtimes.docker import DockerRuntime, DockerSettings

        runtime = DockerRuntime(
            DockerSettings(
                installation=installation.read_text().strip(),
                log_dir=data_dir / "runtime" / "docker" / "logs",
            )
        )
        try:
            for instance in runtime.owned():
                runtime.stop(instance.handle, grace_s=1)
            # Model images this run built (the shared runtime image stays cached).
            label = f"modelport.installation={runtime.settings.installation}"
            for image in runtime.client.images.list(filters={"label": label}):
                for tag in image.tags:
                    with contextlib.suppress(Exception):
                        runtime.client.images.remove(tag)
        except DeployerError:
            pass
    proxy_dir = data_dir / "proxy"
    if proxy_dir.is_dir():
        NginxProxy(proxy_dir, public_url="", check_url="", listen="127.0.0.1:1").stop()


# ---------------------------------------------------------------- personas


@dataclass
class Persona:
    user: Any
    token: str

    def client(self, team: str | None = None) -> Any:
        from rest_framework.test import APIClient

        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {self.token}")
        return client


@dataclass
class Personas:
    """alice is acme's admin, bob a member, vera a viewer; charlie is an outsider (globex)."""

    acme: Any
    globex: Any
    alice: Persona
    bob: Persona
    vera: Persona
    charlie: Persona


@pytest.fixture
def personas(db: None) -> Personas:
    from django.contrib.auth.models import User

    from portal.accounts.choices import Role
    from portal.accounts.services import membership_set, team_create, token_create

    acme = team_create(slug="acme", name="Acme")
    globex = team_create(slug="globex", name="Globex")
    people = {}
    for name, team, role in [
        ("alice", acme, Role.ADMIN),
        ("bob", acme, Role.MEMBER),
        ("vera", acme, Role.VIEWER),
        ("charlie", globex, Role.ADMIN),
    ]:
        user = User.objects.create_user(name, password=f"{name}-password")
        membership_set(team=team, user=user, role=role)
        _, token = token_create(user=user, team=team, name=f"{name}-token")
        people[name] = Persona(user=user, token=token)
    return Personas(acme=acme, globex=globex, **people)


# ---------------------------------------------------------------- model files


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    from tests.onnx_models import linear_model

    path = tmp_path / "linear.onnx"
    linear_model(path)
    return path


@pytest.fixture
def onnx_file_v2(tmp_path: Path) -> Path:
    from tests.onnx_models import linear_model

    path = tmp_path / "linear-v2.onnx"
    linear_model(path, seed=7)
    return path


# ---------------------------------------------------------------- real services


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on a free port, as the run command starts it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=(root / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http(f"{url}/health", timeout_s=120):
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _redis_available(url: str) -> bool:
    if not url.startswith("redis://"):
        return False
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop the worker cleanly (or kill it if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def celery_worker(
    worker_env: dict[str, str], mlflow_server: str, settings: Any, tmp_path: Path
) -> Iterator[Worker]:
    """A real Celery worker process on the Redis broker and the PostgreSQL test database."""
    env = {**worker_env, "MLFLOW_TRACKING_URI": mlflow_server}
    settings.MLFLOW_TRACKING_URI = mlflow_server
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()
        _stop_local_instances(Path(settings.DATA_DIR))


@pytest.fixture
def worker_env(transactional_db: None, settings: Any) -> dict[str, str]:
    """The environment of a worker process on the Redis broker (emptied first) and the
    PostgreSQL test database; start workers with ``start_worker``."""
    from django.db import connection

    broker = os.environ.get("CELERY_BROKER_URL", "")
    require("Redis", _redis_available(broker), "set CELERY_BROKER_URL=redis://… (make test does)")
    require(
        "PostgreSQL",
        connection.vendor == "postgresql",
        "set DATABASE_URL=postgres://… (make test does)",
    )
    import redis

    redis.Redis.from_url(broker).flushdb()
    db = connection.settings_dict
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings_test",
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        ),
        "MODELPORT_DATA_DIR": str(settings.DATA_DIR),
        "PYTHONUNBUFFERED": "1",
    }


def start_worker(
    env: dict[str, str],
    log: Path,
    *,
    queues: tuple[str, ...] = ("pipeline", "convert", "deploy", "batch"),
    concurrency: int = 2,
    include: tuple[str, ...] = (),
) -> Worker:
    """Start a Celery worker (on every queue unless told) and wait until it is ready."""
    process = subprocess.Popen(
        [
            str(BIN / "celery"),
            "-A",
            "portal",
            "worker",
            "-Q",
            ",".join(queues),
            "-c",
            str(concurrency),
            "-n",
            f"test-{os.getpid()}-{log.stem}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            *(["--include", ",".join(include)] if include else []),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while " ready." not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the Celery worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return Worker(process=process, log=log, env=env)


def wait_for(
    predicate: Any, *, timeout_s: float = 60, interval_s: float = 0.2, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(interval_s)


# ---------------------------------------------------------------- Docker engine


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine that answers (make test starts dockerd)."""
    from deployer.images.build import engine_available

    require("Docker engine", engine_available(), "make test starts dockerd as root")


@pytest.fixture(scope="session")
def runtime_image(docker_engine: None) -> Any:
    """The CPU runtime image, built once per runtime version (cold: base + wheels + build)."""
    from deployer.images.runtime import runtime_image_ensure
    from portal.core import engine

    started = time.monotonic()
    image = runtime_image_ensure(engine.image_config(), device="cpu")
    took = time.monotonic() - started
    state = "cached" if image.image.cached else "built"
    print(f"\nruntime image {image.ref}: {state} in {took:.1f} s")
    return image


@pytest.fixture
def docker_mode(
    runtime_image: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The Docker runtime behind nginx, here and in any worker a test starts."""
    from deployer.proxy import find_nginx

    require("nginx", bool(find_nginx()), "apt-get install nginx (make test does)")
    settings.MODELPORT_RUNTIME = "docker"
    monkeypatch.setenv("MODELPORT_RUNTIME", "docker")
    yield
    _stop_containers_and_proxy(Path(settings.DATA_DIR))


def require_module(name: str) -> None:
    """Like ``require``: an optional package (the torch extra) missing fails CI."""
    import importlib.util

    require(name, importlib.util.find_spec(name) is not None, "make test installs the torch extra")


def report_entry(report: str, entry: dict[str, Any]) -> None:
    """Add one figure to artifacts/reports/<report>.json (the issues' closing notes cite them)."""
    import json

    out = REPO / "artifacts" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report}.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if e.get("scenario") != entry.get("scenario")]
    path.write_text(json.dumps([*entries, entry], indent=2, default=str))
