"""The proxy never sends an inference POST to an instance a second time after a timeout."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from deployer.proxy import NginxProxy, Route, find_nginx, route_prefix
from deployer.proxy import config as proxy_config
from tests.conftest import free_port, require

READ_TIMEOUT_S = 1


class _Slow(http.server.BaseHTTPRequestHandler):
    """Counts each request, then answers only after the proxy has given up waiting."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.counts[self.command] += 1  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        time.sleep(READ_TIMEOUT_S + 1.5)
        body = b'{"outputs": []}'
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the proxy has closed the connection

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def _slow_upstream() -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.counts = {"GET": 0, "POST": 0}  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _address(server: http.server.ThreadingHTTPServer) -> str:
    return f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def slow_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NginxProxy]:
    """A real managed proxy (router and gateway) with a short read timeout."""
    require("nginx", bool(find_nginx()), "apt-get install nginx (make test does)")
    # The router gives up first, as it would when an instance is slow; the gateway in
    # front waits long enough to see whatever the router does next.
    for name, seconds in (("HTTP_COMMON", READ_TIMEOUT_S), ("GATEWAY_COMMON", 10 * READ_TIMEOUT_S)):
        text = getattr(proxy_config, name)
        assert "proxy_read_timeout 300s;" in text
        monkeypatch.setattr(
            proxy_config,
            name,
            text.replace("proxy_read_timeout 300s;", f"proxy_read_timeout {seconds}s;"),
        )
    listen = f"127.0.0.1:{free_port()}"
    url = f"http://{listen}"
    proxy = NginxProxy(tmp_path / "proxy", public_url=url, check_url=url, listen=listen)
    proxy.ensure_running()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.parametrize("addresses", [1, 2])
def test_timed_out_inference_post_reaches_an_instance_once(
    slow_proxy: NginxProxy, addresses: int
) -> None:
    """A POST whose instance answers after the proxy's read timeout gets a 504 and is never
    sent again, also when the upstream name has two addresses (a Docker network alias
    shared by two containers resolves so), where nginx could pick another one."""
    servers = [_slow_upstream() for _ in range(addresses)]
    prefix = route_prefix("acme", "slow", "production")
    # sync, not set_route: set_route waits for a health answer this upstream never gives.
    slow_proxy.sync({"d1": Route("d1", prefix, _address(servers[0]), 1)})
    if addresses > 1:
        upstream = slow_proxy.upstream_dir / "d1.conf"
        first = f"    server {_address(servers[0])} max_fails=0;\n"
        extra = "".join(f"    server {_address(s)} max_fails=0;\n" for s in servers[1:])
        upstream.write_text(upstream.read_text().replace(first, first + extra))
        slow_proxy.stop()
        slow_proxy.ensure_running()
    try:
        started = time.monotonic()
        response = requests.post(
            f"{slow_proxy.url(prefix)}v2/models/slow/infer", json={"inputs": []}, timeout=60
        )
        waited = time.monotonic() - started
        time.sleep(READ_TIMEOUT_S + 2)  # a retry would have arrived by now
        posts = sum(s.counts["POST"] for s in servers)  # type: ignore[attr-defined]
        print(
            f"\n{addresses} address(es): POST answered {response.status_code} after "
            f"{waited:.1f} s; the instances got {posts}"
        )
        assert response.status_code == 504
        assert posts == 1
    finally:
        for server in servers:
            server.shutdown()


def test_no_listener_of_the_edge_resends_after_a_timeout(tmp_path: Path) -> None:
    """Router, gateway and every gRPC port: retries only on a connection error, never
    after a timeout (the gRPC ports are not covered by the POST test above)."""
    from deployer.proxy.config import GRPC_SERVER_COMMON, gateway_config, main_config

    texts = {
        "router": main_config(tmp_path, "127.0.0.1:1", 1),
        "gateway": gateway_config(tmp_path, "127.0.0.1:2", "127.0.0.1:1", 1),
        "grpc": GRPC_SERVER_COMMON,
    }
    for where, text in texts.items():
        retries = [line.strip() for line in text.splitlines() if "_next_upstream " in line]
        assert retries, where
        assert all("timeout" not in line for line in retries), (where, retries)
