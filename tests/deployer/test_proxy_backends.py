"""Routes with several backends (replicas): least outstanding requests, and a dead one
costs no request. A real nginx and real upstream servers."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from deployer.proxy import Backend, NginxProxy, ProxyError, Route, route_prefix
from tests.conftest import free_port
from tests.deployer.test_proxy import proxy  # noqa: F401  (the managed nginx fixture)

PREFIX = route_prefix("acme", "fraud", "production")


class _Named(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        time.sleep(self.server.delay_s)  # type: ignore[attr-defined]
        body = self.server.answer.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def _server(answer: str, delay_s: float = 0.0) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    server.answer, server.delay_s = answer, delay_s  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def test_two_backends_share_calls_by_least_outstanding_requests(proxy: NginxProxy) -> None:  # noqa: F811
    slow, slow_addr = _server("slow", delay_s=0.4)
    fast, fast_addr = _server("fast")
    route = Route.of(
        key="d1", prefix=PREFIX, revision=3, backends=[Backend(slow_addr), Backend(fast_addr)]
    )
    proxy.set_route(route)
    upstreams = (proxy.upstream_dir / "d1.conf").read_text()
    assert "least_conn;" in upstreams
    assert f"server {slow_addr} max_fails=0;" in upstreams
    assert f"server {fast_addr} max_fails=0;" in upstreams

    # One at a time, both get calls (no request is outstanding anywhere).
    one_by_one = Counter(requests.get(proxy.url(PREFIX) + "x", timeout=5).text for _ in range(20))
    assert set(one_by_one) == {"slow", "fast"}, one_by_one
    # Many at once: the slow one holds its calls longer, so the fast one gets most.
    with ThreadPoolExecutor(8) as pool:
        answers = Counter(
            pool.map(lambda _: requests.get(proxy.url(PREFIX) + "x", timeout=10).text, range(48))
        )
    assert answers["fast"] > 2 * answers["slow"], answers
    slow.shutdown()
    fast.shutdown()


def test_a_dead_backend_costs_no_request_post_included(proxy: NginxProxy) -> None:  # noqa: F811
    live, live_addr = _server("live")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: refused
    proxy.sync(
        {
            "d1": Route.of(
                key="d1",
                prefix=PREFIX,
                revision=4,
                backends=[Backend(live_addr), Backend(dead)],
            )
        }
    )
    time.sleep(0.3)
    for index in range(40):
        answer = requests.post(proxy.url(PREFIX) + "infer", data=b"x" * (index * 500), timeout=5)
        assert (answer.status_code, answer.text) == (200, "live")
    live.shutdown()


def test_routes_with_backends_survive_their_state_file_and_refuse_bad_values(
    tmp_path: Path,
) -> None:
    route = Route.of(
        key="d1",
        prefix=PREFIX,
        revision=7,
        backends=[
            Backend("127.0.0.1:9002", "127.0.0.1:9003"),
            Backend("127.0.0.1:9000", "127.0.0.1:9001", 3),
        ],
    )
    assert route.upstream == "127.0.0.1:9000"  # the first in a stable order
    from dataclasses import asdict

    assert Route.from_dict(json.loads(json.dumps(asdict(route)))) == route
    # A state file written before routes had backends reads as one backend.
    old = Route.from_dict({"key": "d1", "prefix": PREFIX, "upstream": "127.0.0.1:1", "revision": 1})
    assert old.servers() == (Backend("127.0.0.1:1"),)
    with pytest.raises(ProxyError, match="at least one backend"):
        Route.of(key="d1", prefix=PREFIX, revision=1, backends=[])
    with pytest.raises(ProxyError, match="weight"):
        Route.of(
            key="d1", prefix=PREFIX, revision=1, backends=[Backend("127.0.0.1:1", weight=0)]
        ).check()
    with pytest.raises(ProxyError, match="not a host:port"):
        Route.of(
            key="d1", prefix=PREFIX, revision=1, backends=[Backend("127.0.0.1:1; include /etc/x")]
        ).check()
    with pytest.raises(ProxyError, match="gRPC address or none"):
        Route.of(
            key="d1",
            prefix=PREFIX,
            revision=1,
            backends=[Backend("127.0.0.1:1", "127.0.0.1:2"), Backend("127.0.0.1:3")],
        ).check()
