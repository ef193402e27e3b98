"""The nginx routes: a real nginx, real upstreams, switches that drop nothing."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from deployer.proxy import REVISION_HEADER, NginxProxy, ProxyError, Route, find_nginx, route_prefix
from tests.conftest import free_port, require


class _Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.server.answer.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _upstream(answer: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.answer = answer  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[NginxProxy]:
    require("nginx", bool(find_nginx()), "apt-get install nginx (make test does)")
    listen = f"127.0.0.1:{free_port()}"
    url = f"http://{listen}"
    managed = NginxProxy(tmp_path / "proxy", public_url=url, check_url=url, listen=listen)
    managed.ensure_running()
    yield managed
    managed.stop()


def test_switch_routes_a_stable_path_to_the_new_upstream(proxy: NginxProxy) -> None:
    one, one_addr = _upstream("one")
    two, two_addr = _upstream("two")
    prefix = route_prefix("acme", "fraud", "production")
    url = proxy.url(prefix) + "anything"
    assert requests.get(url, timeout=5).status_code == 404

    proxy.set_route(Route("d1", prefix, one_addr, 11))
    answer = requests.get(url, timeout=5)
    assert (answer.text, answer.headers[REVISION_HEADER]) == ("one", "11")

    seconds = proxy.set_route(Route("d1", prefix, two_addr, 12))
    assert seconds < 5
    for _ in range(20):  # every new connection lands on the new configuration
        answer = requests.get(url, timeout=5)
        assert (answer.text, answer.headers[REVISION_HEADER]) == ("two", "12")

    proxy.remove_route("d1")
    assert requests.get(url, timeout=5).status_code == 404
    one.shutdown()
    two.shutdown()


def test_switches_under_keep_alive_load_drop_no_request(proxy: NginxProxy) -> None:
    """Clients keep their connections open (as SDKs do) while the route switches back and
    forth 100 times. With the router reloaded behind the gateway, none of them sees a
    reset; with one reloaded nginx a few would (the idle-connection race on reload)."""
    one, one_addr = _upstream("one")
    two, two_addr = _upstream("two")
    prefix = route_prefix("acme", "fraud", "production")
    url = proxy.url(prefix) + "anything"
    proxy.set_route(Route("d1", prefix, one_addr, 1))
    stop = threading.Event()
    sent, failures, answers = [0], [], set()
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.get(url, timeout=10)
                status = response.status_code
                outcome = response.text if status == 200 else f"HTTP {status}"
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                sent[0] += 1
                if outcome in ("one", "two"):
                    answers.add(outcome)
                else:
                    failures.append(outcome)
            time.sleep(0.005)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for index in range(100):
        upstream = (two_addr, one_addr)[index % 2]
        proxy.set_route(Route("d1", prefix, upstream, index + 2))
        time.sleep(0.02)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    one.shutdown()
    two.shutdown()
    assert sent[0] > 1000
    assert failures == []
    assert answers == {"one", "two"}


def test_a_route_that_does_not_answer_is_rolled_back(proxy: NginxProxy) -> None:
    one, one_addr = _upstream("one")
    prefix = route_prefix("acme", "fraud", "production")
    proxy.set_route(Route("d1", prefix, one_addr, 1))
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ProxyError, match="did not switch"):
        proxy.set_route(Route("d1", prefix, dead, 2), timeout_s=1)
    answer = requests.get(proxy.url(prefix), timeout=5)
    assert (answer.text, answer.headers[REVISION_HEADER]) == ("one", "1")
    assert proxy.routes()["d1"].revision == 1
    one.shutdown()


@pytest.mark.parametrize(
    "route",
    [
        Route("d1", "/acme/x/; return 200 pwned; #/", "127.0.0.1:1", 1),
        Route("d1", "/acme/x/", "127.0.0.1:1; include /etc/passwd", 1),
        Route("d1 ; x", "/acme/x/", "127.0.0.1:1", 1),
        Route("d1", "/../etc/", "127.0.0.1:1", 1),
    ],
)
def test_nothing_outside_the_allowlist_reaches_the_config(tmp_path: Path, route: Route) -> None:
    proxy = NginxProxy(tmp_path, public_url="http://x", check_url="http://x", listen="127.0.0.1:1")
    with pytest.raises(ProxyError):
        proxy.set_route(route)
    assert not (tmp_path / "locations").exists()


def test_sync_restores_the_routes_the_rows_want(proxy: NginxProxy) -> None:
    one, one_addr = _upstream("one")
    two, two_addr = _upstream("two")
    first = Route("d1", route_prefix("acme", "a", "prod"), one_addr, 1)
    proxy.set_route(first)
    # A leftover route on the same path under another key (a deleted deployment) is displaced.
    proxy.set_route(Route("d9", first.prefix, two_addr, 9))
    assert set(proxy.routes()) == {"d9"}

    wanted = {"d1": first, "d2": Route("d2", route_prefix("acme", "b", "prod"), two_addr, 2)}
    assert proxy.sync(wanted) == 3
    proxy.wait_for(wanted["d2"])
    assert requests.get(proxy.url(first.prefix), timeout=5).text == "one"
    assert requests.get(proxy.url(wanted["d2"].prefix), timeout=5).text == "two"
    assert proxy.sync(wanted) == 0
    one.shutdown()
    two.shutdown()


def test_stopped_proxy_is_started_again(proxy: NginxProxy) -> None:
    proxy.stop()
    assert not proxy.running()
    proxy.ensure_running()
    assert requests.get(f"{proxy.check_url}/healthz", timeout=5).text == "ok\n"
