"""The API client retries mutating calls with one Idempotency-Key."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployer.client import Client, ClientError


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first POST, then 201; remembers the keys it saw."""

    keys: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Flaky.keys.append(self.headers.get("Idempotency-Key", ""))
        status, body = (503, {"detail": "busy"}) if len(_Flaky.keys) == 1 else (201, {"name": "m"})
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[str]:
    _Flaky.keys = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_retry_reuses_the_idempotency_key(flaky_server: str) -> None:
    client = Client(url=flaky_server, token="t", retry_wait_s=0.01)
    created = client._request("POST", "models/", json={"name": "m"})
    assert created == {"name": "m"}
    assert len(_Flaky.keys) == 2
    assert _Flaky.keys[0] == _Flaky.keys[1] != ""


def test_unreachable_server_is_a_clear_error() -> None:
    client = Client(url="http://127.0.0.1:9", token="t", retries=1, retry_wait_s=0.01)
    with pytest.raises(ClientError, match="Cannot reach ModelPort") as error:
        client.deployments()
    assert error.value.code == "unreachable"
