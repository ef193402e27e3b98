"""Run the real serving runtime as a subprocess on free ports."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServingProcess:
    """A `python -m deployer.serving` child with its stderr collected as JSON lines."""

    def __init__(
        self,
        model: Path,
        name: str,
        *args: str,
        grpc: bool = False,
        metrics: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.http_port = free_port()
        self.grpc_port = free_port() if grpc else 0
        self.metrics_port = free_port() if metrics else 0
        command = [
            sys.executable,
            "-m",
            "deployer.serving",
            "--model",
            str(model),
            "--model-name",
            name,
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            *args,
        ]
        child_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=child_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines seen so far."""
        parsed = []
        for line in list(self.lines):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        return parsed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request on a fresh connection: (status, lowercased headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                data,
            )
        finally:
            conn.close()

    def json(self, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        body = None if doc is None else json.dumps(doc)
        status, _, data = self.request(method, path, body)
        return status, json.loads(data) if data else None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n" + "\n".join(self.lines)
                )
            try:
                status, _, _ = self.request("GET", "/v2/health/ready", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not become ready:\n" + "\n".join(self.lines))

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        return code


@pytest.fixture
def start_server() -> Iterator[Any]:
    """Factory: start_server(model_path, name, *flags, grpc=False, metrics=False, ready=True)."""
    started: list[ServingProcess] = []

    def start(
        model: Path, name: str = "model", *args: str, ready: bool = True, **kwargs: Any
    ) -> ServingProcess:
        server = ServingProcess(model, name, *args, **kwargs)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.terminate()
