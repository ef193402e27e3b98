"""Run the whole portal on one machine: web, workers, beat, an MLflow server, nginx.

``python -m portal.stack`` (what ``make run`` calls) prepares the database, creates
the first administrator, starts nginx for stable deployment URLs when it is
installed, starts every process, prefixes their output with their name, and on
Ctrl-C (or SIGTERM) stops them all, serving instances and nginx included. If one of
them dies, the others are stopped too, so nothing is left half-running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent


@dataclass
class Service:
    """One process of the stack."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None


def _pump(name: str, stream: IO[bytes]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        sys.stdout.write(f"{name:>9} | {line}\n")
        sys.stdout.flush()


def _manage(*args: str, env: dict[str, str]) -> None:
    subprocess.run([PYTHON, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env, check=True)


def _wait_http(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local URL
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _services(
    env: dict[str, str], data_dir: Path, bind: str, mlflow_port: int | None
) -> list[Service]:
    services: list[Service] = []
    if mlflow_port is not None:
        mlflow_dir = data_dir / "mlflow"
        (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        services.append(
            Service(
                "mlflow",
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(mlflow_dir / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                # MLflow's own job runner (for its GenAI features) is not used by ModelPort.
                env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        )
    services += [
        Service(
            "web",
            [
                str(BIN / "gunicorn"),
                # ASGI, so that log followers wait on the event loop, not on a thread.
                "portal.asgi:application",
                "--worker-class",
                "uvicorn_worker.UvicornWorker",
                "--bind",
                bind,
                "--workers",
                env.get("MODELPORT_WEB_WORKERS", "2"),
                "--timeout",
                "900",
                "--access-logfile",
                "-",
                *_gunicorn_files(data_dir),
            ],
        ),
        Service(
            "pipeline",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-Q",
                "pipeline",
                "-n",
                "pipeline@%h",
                "-c",
                env.get("MODELPORT_PIPELINE_CONCURRENCY", "2"),
                "--loglevel",
                "INFO",
            ],
        ),
        # Sandboxed conversions and image builds: long work, with workers of its own so
        # that rollbacks on the deploy worker never wait behind it.
        Service(
            "convert",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-Q",
                "convert",
                "-n",
                "convert@%h",
                "-c",
                env.get("MODELPORT_CONVERT_CONCURRENCY", "2"),
                "--loglevel",
                "INFO",
            ],
        ),
        # Batch jobs: a dataset scored for minutes or hours, on a worker of its own.
        Service(
            "batch",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-Q",
                "batch",
                "-n",
                "batch@%h",
                "-c",
                env.get("MODELPORT_BATCH_CONCURRENCY", "1"),
                "--loglevel",
                "INFO",
            ],
        ),
        Service(
            "deploy",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-Q",
                "deploy",
                "-n",
                "deploy@%h",
                "-c",
                "2",
                "--loglevel",
                "INFO",
                "-B",
                "--schedule",
                str(data_dir / "celerybeat-schedule"),
            ],
        ),
        # Async inference: works off every deployment's spool (README "Async inference").
        Service("async", [PYTHON, str(ROOT / "manage.py"), "async_dispatcher"]),
        # Hears serving instances die (pidfds, Docker events) and hands their
        # replacement to the deploy worker.
        Service("watch", [PYTHON, str(ROOT / "manage.py"), "deployments_watch"]),
    ]
    return services


# Longest path a Unix socket may have (sun_path is 108 bytes on Linux, with its NUL).
_MAX_SOCKET_PATH = 107


def _gunicorn_files(data_dir: Path) -> list[str]:
    """Keep gunicorn's control socket and worker heartbeat files in the data directory
    (by default it writes the socket under ``~/.gunicorn/``)."""
    run_dir = data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    socket_path = run_dir / "gunicorn.ctl"
    control = (
        ["--control-socket", str(socket_path)]
        if len(str(socket_path).encode()) <= _MAX_SOCKET_PATH
        # A data directory this deep cannot hold a socket: go without one, never outside.
        else ["--no-control-socket"]
    )
    return [*control, "--worker-tmp-dir", str(run_dir)]


def _stop_all(services: list[Service]) -> None:
    """Ask each main process to shut down cleanly, then kill what is left of its group."""
    running = [s.process for s in services if s.process is not None]
    for process in running:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Children (pool workers, uvicorn) share the process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _django(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()


def _start_proxy(env: dict[str, str]) -> str:
    """Start the managed nginx (stable deployment URLs) when there is one; its URL or ""."""
    _django(env)
    from deployer.errors import DeployerError
    from portal.core import engine

    proxy = engine.proxy()
    if proxy is None or not proxy.managed:
        return ""
    try:
        proxy.ensure_running()
    except DeployerError as exc:
        print(f"nginx did not start ({exc}); deployments get direct URLs.", flush=True)
        return ""
    return proxy.public_url


def _direct_address(local: bool) -> str:
    """What a deployment's address does without a proxy, in this runtime mode."""
    from django.conf import settings

    if local and settings.MODELPORT_LOCAL_HANDOVER:
        return (
            "each deployment answers at its own port, which stays the same across "
            "rollouts and rollbacks (its listening sockets are handed from instance to "
            "instance)."
        )
    return (
        "each deployment answers at its instance's own address, which changes with every rollout."
    )


def startup_choices(proxy_url: str) -> list[str]:
    """Two lines for the start-up banner: where instances run and what gives them their
    address, each with the setting and the finding that decided it."""
    from django.conf import settings

    from deployer.images.build import EngineUnavailable, docker_client
    from deployer.proxy import find_nginx

    runtime: str = settings.MODELPORT_RUNTIME
    if runtime == "local":
        runtime_line = "Runtime: local processes (MODELPORT_RUNTIME=local)."
    else:
        try:
            client = docker_client(timeout_s=5)
            version = client.version().get("Version", "?")
            client.close()
        except EngineUnavailable as exc:
            runtime_line = (
                f"Runtime: Docker containers (MODELPORT_RUNTIME=docker), but {exc.message}"
                if runtime == "docker"
                else "Runtime: local processes (MODELPORT_RUNTIME=auto and no Docker engine "
                f"answers: {exc.message})"
            )
        else:
            why = "" if runtime == "docker" else " and a Docker engine answers"
            runtime_line = (
                f"Runtime: Docker containers (MODELPORT_RUNTIME={runtime}{why}: "
                f"Docker {version}); each version gets an image."
            )
    mode: str = settings.MODELPORT_PROXY
    nginx = find_nginx()
    local = runtime_line.startswith("Runtime: local processes")
    if mode == "none":
        proxy_line = "Proxy: none (MODELPORT_PROXY=none); " + _direct_address(local)
    elif mode == "external":
        proxy_line = (
            f"Proxy: an external nginx at {settings.MODELPORT_PROXY_URL} "
            "(MODELPORT_PROXY=external)."
        )
    elif proxy_url:
        why = "" if mode == "nginx" else f" and nginx is installed at {nginx}"
        proxy_line = (
            f"Proxy: nginx at {proxy_url} (MODELPORT_PROXY={mode}{why}); deployments keep "
            "one address across versions."
        )
    elif nginx:
        proxy_line = "Proxy: none (nginx did not start, see above); " + _direct_address(local)
    else:
        proxy_line = (
            f"Proxy: none (MODELPORT_PROXY={mode} and nginx is not installed); "
            + _direct_address(local)
            + " Install nginx for one address per deployment under one port."
        )
    return [runtime_line, proxy_line]


def _stop_serving_instances(env: dict[str, str]) -> int:
    """Stop the serving instances and the proxy; reconcile restarts them on the next start."""
    _django(env)
    from deployer.errors import DeployerError
    from portal.core import engine

    stopped = 0
    try:
        for runtime in engine.runtimes_in_use():
            owned = runtime.owned()
            for instance in owned:
                runtime.stop(instance.handle, grace_s=5)
            stopped += len(owned)
    except DeployerError as exc:
        print(f"Some serving instances could not be stopped: {exc}", flush=True)
    proxy = engine.proxy()
    if proxy is not None and proxy.managed:
        proxy.stop()
    # The deploy worker starts the log shipper in a session of its own, so Ctrl-C never
    # reaches it: without this it would linger until it noticed it was idle (a minute).
    engine.docker_runtime().stop_log_shipper()
    return stopped


def _build_images_ahead(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Build the converter and runtime images in the background (a one-off: its end,
    success or not, stops nothing), so the first upload does not wait for them."""
    process = subprocess.Popen(
        [PYTHON, str(ROOT / "manage.py"), "build_images"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    threading.Thread(target=_pump, args=("images", process.stdout), daemon=True).start()
    return process


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    env["PYTHONUNBUFFERED"] = "1"
    data_dir = Path(env.get("MODELPORT_DATA_DIR", str(ROOT / "var"))).resolve()
    env["MODELPORT_DATA_DIR"] = str(data_dir)
    bind = env.get("MODELPORT_BIND", "127.0.0.1:8000")
    mlflow_port: int | None = None
    if not env.get("MLFLOW_TRACKING_URI"):
        # No MLflow server configured: run one on the local store, and point everything at it.
        mlflow_port = int(env.get("MODELPORT_MLFLOW_PORT", "5000"))
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
        env.setdefault("MODELPORT_MLFLOW_UI_URL", env["MLFLOW_TRACKING_URI"])

    print("Preparing the database and the first administrator…", flush=True)
    _manage("migrate", "--no-input", "-v", "0", env=env)
    _manage("collectstatic", "--no-input", "-v", "0", env=env)
    _manage("bootstrap", env=env)

    proxy_url = _start_proxy(env)
    services = _services(env, data_dir, bind, mlflow_port)
    stopping = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    for service in services:
        service.process = subprocess.Popen(
            service.command,
            cwd=ROOT,
            env={**env, **service.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert service.process.stdout is not None
        threading.Thread(
            target=_pump, args=(service.name, service.process.stdout), daemon=True
        ).start()
        if service.name == "mlflow" and not _wait_http(
            f"{env['MLFLOW_TRACKING_URI']}/health", timeout_s=90
        ):
            print("The MLflow server did not come up; stopping.", flush=True)
            _stop_all(services)
            return 1

    images = _build_images_ahead(env)
    host, _, port = bind.rpartition(":")
    for line in startup_choices(proxy_url):
        print(line, flush=True)
    print(
        f"\nModelPort is starting at http://{host or '127.0.0.1'}:{port}/ "
        f"(MLflow UI: {env.get('MODELPORT_MLFLOW_UI_URL', 'not started')}"
        + (f"; deployments at {proxy_url}/<team>/<model>/<deployment>/" if proxy_url else "")
        + "). Press Ctrl-C to stop everything.\n",
        flush=True,
    )
    exit_code = 0
    while not stopping.is_set():
        for service in services:
            assert service.process is not None
            if service.process.poll() is not None:
                print(
                    f"{service.name} exited with status {service.process.returncode}; "
                    "stopping the others.",
                    flush=True,
                )
                exit_code = 1
                stopping.set()
                break
        stopping.wait(0.5)
    print("\nStopping ModelPort…", flush=True)
    if images.poll() is None:
        os.killpg(images.pid, signal.SIGTERM)
    _stop_all(services)
    stopped = _stop_serving_instances(env)
    if stopped:
        print(f"Stopped {stopped} serving instance(s); they restart when ModelPort starts again.")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
