"""Async inference (Prefer: respond-async) on a real serving process and a real dispatcher:
202 with a Location, polling, expiry, the queue bound, keys, callbacks signed with HMAC, and
bad input on a real socket."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
import pytest
from serving_onnx_models import mlp, mlp_reference

from deployer.async_dispatch import Dispatcher, DispatchSettings, Target, verify
from deployer.serving.async_headers import parse_prefer
from deployer.serving.async_spool import Spool

KEY = "mpk_async_owner_key_0123456789"
OTHER = "mpk_async_same_team_key_987654"
PORTAL = "mpk_portal_dispatcher_key_000000"
SECRET = b"team-callback-secret-for-tests"


def _entry(key_id: str, key: str) -> dict[str, object]:
    return {"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest()}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _body(seed: int) -> tuple[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
    doc = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": x.tolist()}]}
    return json.dumps(doc), x


@pytest.fixture
def deployment(start_server: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A serving process with keys and a spool (queue bound 5, callbacks to loopback)."""
    model, layers = mlp(tmp_path / "mlp.onnx")
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "version": 1,
                "public": False,
                "keys": [_entry("k_1", KEY), _entry("k_2", OTHER), _entry("portal", PORTAL)],
            }
        )
    )
    spool_dir = tmp_path / "async"
    Spool(spool_dir).ensure()
    server = start_server(
        model,
        "mlp",
        "--keys-file", str(keys),
        "--async-dir", str(spool_dir),
        "--async-max-queue", "5",
        "--async-callback-hosts", "127.0.0.1",
    )  # fmt: skip
    return {"server": server, "layers": layers, "spool": spool_dir}


def _dispatcher(
    env: dict[str, Any], *, serving: bool = True, **overrides: Any
) -> tuple[Dispatcher, threading.Thread]:
    server = env["server"]
    target = Target(
        deployment_id=1,
        spool_dir=env["spool"],
        infer_url=f"{server.url}/v2/models/mlp/infer" if serving else None,
        headers=_bearer(PORTAL),
        callback_secret=SECRET,
    )
    settings = DispatchSettings(
        **{"callback_hosts": frozenset({"127.0.0.1"}), "lease_s": 5.0, **overrides}
    )
    dispatcher = Dispatcher(lambda: [target], settings)
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    return dispatcher, thread


def _wait(predicate: Any, timeout_s: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _submit(server: Any, body: str, key: str = KEY, **headers: str) -> tuple[int, dict, bytes]:
    return server.request(
        "POST",
        "/v2/models/mlp/infer",
        body,
        {**_bearer(key), "Prefer": "respond-async", "Content-Type": "application/json", **headers},
    )


def _path_of(location: str, request_path: str = "/v2/models/mlp/infer") -> str:
    return urljoin(f"http://x{request_path}", location).removeprefix("http://x")


def test_accepted_polled_answered_then_expired(deployment: dict[str, Any]) -> None:
    server = deployment["server"]
    body, x = _body(1)
    status, headers, data = _submit(server, body)
    assert status == 202, data
    assert headers["preference-applied"] == "respond-async"
    assert headers["retry-after"] == "1"
    location = _path_of(headers["location"])
    request_id = json.loads(data)["id"]
    assert location == f"/v2/models/mlp/async/{request_id}"
    # Durable before the answer: the file is in the spool now.
    assert (deployment["spool"] / "pending" / f"{request_id}.req").is_file()
    # Nobody ran it yet: 202 while waiting.
    status, headers, data = server.request("GET", location, headers=_bearer(KEY))
    assert status == 202
    assert json.loads(data) == {"id": request_id, "status": "pending"}
    # The versioned route gives a Location that resolves to the same place.
    status, headers, _ = server.request(
        "POST",
        "/v2/models/mlp/versions/1/infer",
        body,
        {**_bearer(KEY), "Prefer": "respond-async"},
    )
    assert status == 202
    versioned = _path_of(headers["location"], "/v2/models/mlp/versions/1/infer")
    assert versioned.startswith("/v2/models/mlp/async/")

    dispatcher, thread = _dispatcher(deployment, result_ttl_s=3.0)
    try:
        status, headers, data = _wait(
            lambda: (r := server.request("GET", location, headers=_bearer(KEY)))[0] != 202 and r,
            what="the async answer",
        )
        assert status == 200, data
        sync = server.request("POST", "/v2/models/mlp/infer", body, _bearer(KEY))
        assert sync[0] == 200
        assert json.loads(data) == json.loads(sync[2])  # the normal V2 response body
        out = np.array(json.loads(data)["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(out, mlp_reference(deployment["layers"], x).ravel(), rtol=1e-5)
        # Kept for the set time, then gone: 404.
        _wait(
            lambda: server.request("GET", location, headers=_bearer(KEY))[0] == 404,
            timeout_s=30,
            what="the answer to expire",
        )
    finally:
        dispatcher.stop()
        thread.join(timeout=30)


def test_queue_is_bounded_with_429_and_retry_after(deployment: dict[str, Any]) -> None:
    server = deployment["server"]
    body, _ = _body(2)
    for _ in range(5):
        assert _submit(server, body)[0] == 202
    status, headers, data = _submit(server, body)
    assert status == 429, data
    assert int(headers["retry-after"]) >= 1
    assert "full" in json.loads(data)["error"]
    # A synchronous call is not affected by the async queue.
    assert server.request("POST", "/v2/models/mlp/infer", body, _bearer(KEY))[0] == 200


def test_keys_apply_to_submit_and_poll(deployment: dict[str, Any]) -> None:
    server = deployment["server"]
    body, _ = _body(3)
    headers = {"Prefer": "respond-async"}
    # No key, a key of another team (not in this deployment's file): 401, as for sync calls.
    sync_no_key = server.request("POST", "/v2/models/mlp/infer", body)
    no_key = server.request("POST", "/v2/models/mlp/infer", body, headers)
    assert no_key[0] == sync_no_key[0] == 401
    assert no_key[1]["www-authenticate"] == "Bearer"
    outsider = server.request(
        "POST", "/v2/models/mlp/infer", body, {**headers, **_bearer("mpk_other_team_key_1")}
    )
    assert outsider[0] == 401
    assert not os.listdir(deployment["spool"] / "pending")  # nothing refused was stored

    status, reply, _data = _submit(server, body)
    assert status == 202
    location = _path_of(reply["location"])
    assert server.request("GET", location)[0] == 401
    assert server.request("GET", location, headers=_bearer("mpk_other_team_key_1"))[0] == 401
    # A key of the same team that did not send it learns nothing, not even that it exists.
    assert server.request("GET", location, headers=_bearer(OTHER))[0] == 404
    assert server.request("GET", location, headers=_bearer(KEY))[0] == 202


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    fail_first = 0

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        type(self).received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"received": [], "fail_first": 2})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()


def test_callback_is_signed_and_retried(
    deployment: dict[str, Any], receiver: tuple[str, type[_Receiver]]
) -> None:
    server = deployment["server"]
    url, handler = receiver
    body, x = _body(4)
    status, _reply, data = _submit(server, body, **{"ModelPort-Callback-URL": url})
    assert status == 202, data
    request_id = json.loads(data)["id"]
    dispatcher, thread = _dispatcher(deployment)
    try:
        _wait(lambda: handler.received, timeout_s=60, what="the callback")
    finally:
        dispatcher.stop()
        thread.join(timeout=30)
    headers, payload = handler.received[0]
    assert verify(SECRET, headers, payload)
    assert not verify(b"another team's secret", headers, payload)
    assert not verify(SECRET, headers, payload + b" ")
    assert headers["ModelPort-Request-Id"] == request_id
    assert headers["ModelPort-Status"] == "200"
    out = np.array(json.loads(payload)["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(out, mlp_reference(deployment["layers"], x).ravel(), rtol=1e-5)
    assert handler.fail_first == 0  # it was refused twice and tried again
    assert not os.listdir(deployment["spool"] / "outbox")


def test_callback_hosts_are_checked_at_submit(deployment: dict[str, Any]) -> None:
    server = deployment["server"]
    body, _ = _body(5)
    for url, expected in [
        ("http://169.254.169.254/latest/meta-data", "not allowed"),
        ("ftp://127.0.0.1/x", "http"),
        ("http://user:pw@127.0.0.1/x", "user name"),
        ("http://127.0.0.1:99999/x", "malformed"),
        ("/relative", "absolute"),
    ]:
        status, _, data = _submit(server, body, **{"ModelPort-Callback-URL": url})
        assert status == 400, (url, data)
        assert expected in json.loads(data)["error"], (url, data)


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_bad_input_on_a_real_socket(deployment: dict[str, Any]) -> None:
    server = deployment["server"]
    spool = deployment["spool"]
    body, _ = _body(6)
    auth = f"Authorization: Bearer {KEY}\r\n".encode()

    # Over the body limit: refused before it is read, nothing stored.
    head = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Prefer: respond-async\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (64 * 1024 * 1024 + 1)
    )  # fmt: skip
    answer = _raw(server.http_port, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # Malformed Prefer values: 400 naming the problem.
    for prefer in ['respond-async="unterminated', "=respond-async", "respond-async=a b"]:
        status, _, data = server.request(
            "POST", "/v2/models/mlp/infer", body, {**_bearer(KEY), "Prefer": prefer}
        )
        assert status == 400, (prefer, data)
        assert "Prefer" in json.loads(data)["error"]
    # Other preferences, and parameters, are ignored; respond-async among them is honoured.
    status, _, _ = server.request(
        "POST", "/v2/models/mlp/infer", body, {**_bearer(KEY), "Prefer": "return=minimal"}
    )
    assert status == 200
    status, headers, _ = server.request(
        "POST",
        "/v2/models/mlp/infer",
        body,
        {**_bearer(KEY), "Prefer": 'wait=10, Respond-Async; x="a,b", handling=lenient'},
    )
    assert status == 202
    assert headers["preference-applied"] == "respond-async"
    # A body the model refuses is refused now, not accepted and failed later.
    status, _, data = _submit(server, '{"inputs": [{"name": "nope"}]}')
    assert status == 400, data

    # Ids that try to leave the spool: always 404, never another file.
    (spool / "done" / ".." / "secret.res").write_bytes(b'{"status":200,"key_id":null}\nSECRET')
    for bad in [
        "..%2fsecret",
        "%2e%2e%2fsecret",
        "..",
        "secret",
        "0" * 31 + "G",
        "0" * 33,
        "../../keys",
        "A" * 32,
    ]:
        request = (
            b"GET /v2/models/mlp/async/" + bad.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            + auth + b"Connection: close\r\n\r\n"
        )  # fmt: skip
        answer = _raw(server.http_port, request)
        assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 404 Not Found",), (bad, answer[:200])
        assert b"SECRET" not in answer
    # The process is still up and answering.
    assert server.request("POST", "/v2/models/mlp/infer", body, _bearer(KEY))[0] == 200


def test_prefer_parser() -> None:
    assert parse_prefer(["respond-async, wait=100"]) == {"respond-async": "", "wait": "100"}
    assert parse_prefer(['foo="a,b;c", RESPOND-ASYNC']) == {"foo": "a,b;c", "respond-async": ""}
    assert parse_prefer(["return=minimal; foo=bar", "return=representation"]) == {
        "return": "minimal"
    }
    with pytest.raises(ValueError, match="quoted"):
        parse_prefer(['x="open'])


def test_a_request_that_waits_too_long_gets_a_504(deployment: dict[str, Any]) -> None:
    server = deployment["server"]
    body, _ = _body(7)
    status, headers, _ = _submit(server, body)
    assert status == 202
    location = _path_of(headers["location"])
    # The deployment has no instance for the dispatcher to call (stopped, failed).
    dispatcher, thread = _dispatcher(deployment, serving=False, max_wait_s=1.0)
    try:
        status, _, data = _wait(
            lambda: (r := server.request("GET", location, headers=_bearer(KEY)))[0] != 202 and r,
            what="the request to be given up",
        )
    finally:
        dispatcher.stop()
        thread.join(timeout=30)
    assert status == 504
    assert "no serving instance" in json.loads(data)["error"]
