"""Start and stop the servers under test; each serves one ONNX file under one name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEERS_VENV = REPO / "bench" / ".venv-peers"
# KServe, BentoML and PyTriton each pin their own web stack: one venv apiece.
KSERVE_VENV = REPO / "bench" / ".venv-kserve"
BENTOML_VENV = REPO / "bench" / ".venv-bentoml"
PYTRITON_VENV = REPO / "bench" / ".venv-pytriton"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running server: its process, where it answers, and which protocols it speaks."""

    name: str
    model: str
    proc: subprocess.Popen
    http_port: int
    grpc_port: int = 0
    infer_path: str = ""
    # "v2" (Open Inference Protocol JSON), "mlflow" ({"inputs": ...} on /invocations) or
    # "bentoml" ({"x": ...} on /predict, answered by a bare JSON list)
    json_style: str = "v2"
    binary: bool = False
    log: Path | None = None
    workdir: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}{self.infer_path}"

    def rss_mb(self) -> float:
        """Resident memory of the server and all its descendants, in MiB."""
        return tree_rss_kb(self.proc.pid) / 1024

    def stop(self) -> None:
        stop_group(self.proc, timeout_s=30)


def stop_group(proc: subprocess.Popen, *, timeout_s: float) -> None:
    """SIGTERM the process group ``proc`` leads; SIGKILL it after ``timeout_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    return children


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of a process and all its descendants."""
    children = _children()
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total / ticks


def wait_idle(servers: list[Server], threshold: float = 0.05, timeout: float = 180.0) -> float:
    """Wait until no server burns CPU (a peer may still be working off a closed run's
    backlog, which would steal CPU from the next measurement); returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = sum(tree_cpu_seconds(s.proc.pid) for s in servers)
        time.sleep(0.5)
        after = sum(tree_cpu_seconds(s.proc.pid) for s in servers)
        if (after - before) / 0.5 < threshold:
            break
    return time.monotonic() - start


def tree_rss_kb(root: int) -> int:
    children = _children()
    total = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


def _spawn(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO):
    handle = open(log, "wb")  # noqa: SIM115 - stays open for the child's lifetime
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout}s; see {log}")


def start_modelport(
    onnx_path: Path, name: str, workdir: Path, extra_args: list[str] = ()
) -> Server:
    http_port, grpc_port = free_port(), free_port()
    log = workdir / f"modelport-{name}.log"
    command = [
        sys.executable,
        "-m",
        "deployer.serving",
        "--model",
        str(onnx_path),
        "--model-name",
        name,
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        "0",
        *extra_args,
    ]
    proc = _spawn(command, log, env={"PYTHONPATH": str(REPO)})
    server = Server(
        "modelport",
        name,
        proc,
        http_port,
        grpc_port,
        infer_path=f"/v2/models/{name}/infer",
        binary=True,
        log=log,
    )
    _wait_http(f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", proc, log)
    return server


def start_mlflow(onnx_path: Path, name: str, workdir: Path) -> Server:
    """`mlflow models serve --env-manager local` on a pyfunc wrapping the ONNX file."""
    import mlflow.pyfunc

    model_dir = workdir / f"mlflow-{name}"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from onnx_pyfunc import OnnxPyfunc

        mlflow.pyfunc.save_model(
            str(model_dir),
            python_model=OnnxPyfunc(),
            artifacts={"onnx": str(onnx_path)},
            code_paths=[str(Path(__file__).with_name("onnx_pyfunc.py"))],
        )
    finally:
        sys.path.remove(str(Path(__file__).parent))
    port = free_port()
    log = workdir / f"mlflow-{name}.log"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow_bin),
        "models",
        "serve",
        "-m",
        str(model_dir),
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    env = {
        "MLFLOW_TRACKING_URI": f"file://{workdir / 'mlruns'}",
        # mlflow execs `uvicorn`, which lives beside this interpreter.
        "PATH": f"{mlflow_bin.parent}:{os.environ.get('PATH', '')}",
    }
    proc = _spawn(command, log, env=env)
    server = Server(
        "mlflow", name, proc, port, infer_path="/invocations", json_style="mlflow", log=log
    )
    _wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
    return server


def start_mlserver(onnx_path: Path, name: str, workdir: Path) -> Server | None:
    """MLServer (from bench/.venv-peers) with the small onnxruntime runtime in this folder."""
    binary = PEERS_VENV / "bin" / "mlserver"
    if not binary.exists():
        print(f"MLServer not installed in {PEERS_VENV}; skipping it (see README)", flush=True)
        return None
    root = workdir / f"mlserver-{name}"
    if root.exists():
        shutil.rmtree(root)
    model_dir = root / name
    model_dir.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), root / "mlserver_runtime.py")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "host": "127.0.0.1",
                "grpc_max_message_length": 64 * 1024 * 1024,
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": name,
                "implementation": "mlserver_runtime.OnnxRuntimeModel",
                "parameters": {"uri": str(onnx_path)},
            }
        )
    )
    log = workdir / f"mlserver-{name}.log"
    proc = _spawn([str(binary), "start", str(root)], log, cwd=root)
    server = Server(
        "mlserver",
        name,
        proc,
        http_port,
        grpc_port,
        infer_path=f"/v2/models/{name}/infer",
        log=log,
    )
    _wait_http(f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", proc, log)
    return server


def _start_v2_peer(
    label: str, venv: Path, name: str, workdir: Path, args: Callable[[int, int], list[str]]
) -> Server | None:
    """A peer in its own venv that speaks V2 REST and gRPC on two ports (None: not there,
    or it did not start; the reason is printed)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"{label} not installed in {venv}; skipping it (see README)", flush=True)
        return None
    http_port, grpc_port = free_port(), free_port()
    log = workdir / f"{label.lower()}-{name}.log"
    proc = _spawn([str(python), *args(http_port, grpc_port)], log, cwd=workdir)
    server = Server(
        label.lower(),
        name,
        proc,
        http_port,
        grpc_port,
        infer_path=f"/v2/models/{name}/infer",
        binary=True,
        log=log,
    )
    try:
        _wait_http(f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", proc, log)
    except RuntimeError:
        server.stop()
        print(f"{label} did not start here: {_first_error(log)}", flush=True)
        return None
    return server


def start_kserve(onnx_path: Path, name: str, workdir: Path) -> Server | None:
    """KServe's Python model server (bench/.venv-kserve) with ``kserve_model.py``.

    Its defaults: one uvicorn worker, REST and gRPC both on (KServe's own documentation runs
    custom predictors this way; more workers fork the model per process)."""
    return _start_v2_peer(
        "KServe",
        KSERVE_VENV,
        name,
        workdir,
        lambda http, grpc: [
            str(Path(__file__).with_name("kserve_model.py")),
            "--model_name", name, "--model_path", str(onnx_path),
            "--http_port", str(http), "--grpc_port", str(grpc),
            # Per-request latency logging is on by default; the access log stays on, as ours.
            "--enable_latency_logging", "false",
        ],
    )  # fmt: skip


def start_bentoml(onnx_path: Path, name: str, workdir: Path) -> Server | None:
    """``bentoml serve`` (bench/.venv-bentoml) on ``bento_service.py``: REST JSON only."""
    binary = BENTOML_VENV / "bin" / "bentoml"
    if not binary.exists():
        print(f"BentoML not installed in {BENTOML_VENV}; skipping it (see README)", flush=True)
        return None
    port = free_port()
    log = workdir / f"bentoml-{name}.log"
    command = [str(binary), "serve", "bento_service:OnnxService", "--port", str(port)]
    env = {"BENCH_ONNX": str(onnx_path), "BENTOML_HOME": str(workdir / "bentoml-home")}
    proc = _spawn(command, log, env=env, cwd=Path(__file__).parent)
    server = Server(
        "bentoml", name, proc, port, infer_path="/predict", json_style="bentoml", log=log
    )
    _wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
    return server


def start_pytriton(onnx_path: Path, name: str, workdir: Path) -> Server | None:
    """Triton's own server as ``nvidia-pytriton`` ships it (bench/.venv-pytriton).

    PyTriton binds a Python function to Triton's C++ server through Triton's Python
    backend; where that backend's stub cannot start on this interpreter, this returns
    None and prints Triton's own reason."""
    return _start_v2_peer(
        "Triton",
        PYTRITON_VENV,
        name,
        workdir,
        lambda http, grpc: [
            str(Path(__file__).with_name("pytriton_model.py")),
            name, str(onnx_path), str(http), str(grpc),
        ],
    )  # fmt: skip


def _first_error(log: Path) -> str:
    """The exception that stopped a server, from its log (Triton quotes Python tracebacks
    inside one log line, with escaped newlines)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if "failed to load" in line or "Traceback" in line:
            found = re.findall(r"([A-Z]\w*(?:Error|Exception): [^\\\"\n]+)", line)
            if found:
                return found[-1].strip()[:300]
    lines = text.strip().splitlines()
    return lines[-1].strip()[:300] if lines else "no output"
