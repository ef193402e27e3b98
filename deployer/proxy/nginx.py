"""Stable endpoints: nginx routes one URL per deployment to its live instance.

ModelPort never proxies requests itself. It writes one small include file per
deployment (an ``upstream`` with the live instance's address and a ``location``
for the deployment's path) and asks nginx to reload: nginx starts new workers on
the new configuration and lets the old ones finish the requests they hold. Every
value written passes an allowlist first.

A reload alone would still drop requests now and then: the old workers close their
idle keep-alive connections at once, and a client that sent a request on such a
connection in that instant gets a reset (measured: 6 failures in 200 reloads under
300 req/s). So two nginx masters run: a *gateway* that holds the clients'
connections and is never reloaded for a route, and the *router* behind it that
holds the routes and is reloaded. The gateway opens a new loopback connection to
the router for each request, so no request is ever sent on a connection a reload
is closing.

Two ways to run nginx:

- *managed*: ModelPort writes the whole configuration under its data folder and
  starts the gateway and router masters itself, and reloads the router (``make run``,
  tests);
- *external*: nginx runs elsewhere (its own container in docker-compose, with both
  masters) and includes the route folder; ModelPort writes the route files and calls
  a reload hook (for docker-compose: a SIGHUP to the proxy container's router).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from deployer.errors import DeployerError
from deployer.proxy.config import GRPC_SERVER_COMMON, gateway_config, main_config
from deployer.runtimes.local import free_port

REVISION_HEADER = "X-ModelPort-Revision"
_KEY = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_SEGMENT = r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_PREFIX = re.compile(rf"^/(?:{_SEGMENT}/){{1,6}}$")
_UPSTREAM = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})?:[0-9]{1,5}$")
_LISTEN = re.compile(r"^(?:[0-9.]+|\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")


class ProxyError(DeployerError):
    """The proxy could not be configured or did not take a new route."""

    code = "proxy_failed"


@dataclass(frozen=True)
class Backend:
    """One instance behind a route: its REST and gRPC addresses, and its share of calls."""

    upstream: str
    grpc_upstream: str = ""
    # nginx's server weight (1-100); all equal today (replicas), uneven later (canary).
    weight: int = 1

    def check(self) -> Backend:
        if not _UPSTREAM.match(self.upstream):
            raise ProxyError(f"{self.upstream!r} is not a host:port address.")
        if self.grpc_upstream and not _UPSTREAM.match(self.grpc_upstream):
            raise ProxyError(f"{self.grpc_upstream!r} is not a host:port address.")
        if not isinstance(self.weight, int) or not 1 <= self.weight <= 100:
            raise ProxyError("A backend's weight must be an integer from 1 to 100.")
        return self


@dataclass(frozen=True)
class Route:
    """Send requests under ``prefix`` to ``upstream`` (host:port), serving ``revision``.

    A route to several instances (replicas) lists them all in ``backends``; nginx then
    sends each request to the one with the fewest requests in flight (``least_conn``,
    by weight). ``upstream``/``grpc_upstream`` are the first backend's addresses.
    """

    key: str
    prefix: str
    upstream: str
    revision: int
    # The instance's gRPC address (host:port); empty: the route carries REST only.
    grpc_upstream: str = ""
    backends: tuple[Backend, ...] = ()

    @classmethod
    def of(cls, *, key: str, prefix: str, revision: int, backends: list[Backend]) -> Route:
        """A route to ``backends`` (at least one), in a stable order."""
        if not backends:
            raise ProxyError("A route needs at least one backend.")
        ordered = tuple(sorted(backends, key=lambda b: (b.upstream, b.grpc_upstream)))
        first = ordered[0]
        return cls(key, prefix, first.upstream, revision, first.grpc_upstream, ordered)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Route:
        """A route as :func:`dataclasses.asdict` wrote it (state files of any age)."""
        backends = data.get("backends") or []
        if not isinstance(backends, list):
            raise ProxyError("A route's backends must be a list.")
        fields = {k: v for k, v in data.items() if k != "backends"}
        return cls(**fields, backends=tuple(Backend(**b) for b in backends))  # type: ignore[arg-type]

    def servers(self) -> tuple[Backend, ...]:
        """Every backend (a route written with one address only: that one)."""
        return self.backends or (Backend(self.upstream, self.grpc_upstream),)

    def check(self) -> Route:
        """This route, if every field is in its allowlist."""
        if not _KEY.match(self.key):
            raise ProxyError(f"{self.key!r} is not a route key.")
        if not _PREFIX.match(self.prefix):
            raise ProxyError(f"{self.prefix!r} is not an allowed route path.")
        if not _UPSTREAM.match(self.upstream):
            raise ProxyError(f"{self.upstream!r} is not a host:port address.")
        if self.grpc_upstream and not _UPSTREAM.match(self.grpc_upstream):
            raise ProxyError(f"{self.grpc_upstream!r} is not a host:port address.")
        if not isinstance(self.revision, int) or self.revision < 0:
            raise ProxyError("A route's revision must be a non-negative integer.")
        if len(self.backends) > 64:
            raise ProxyError("A route may have at most 64 backends.")
        for backend in self.backends:
            backend.check()
        grpc = {bool(b.grpc_upstream) for b in self.servers()}
        if len(grpc) > 1:
            raise ProxyError("Either every backend of a route has a gRPC address or none has.")
        return self


def route_prefix(*segments: str) -> str:
    """``/a/b/c/`` from checked path segments (team, model, deployment)."""
    prefix = "/" + "".join(f"{segment}/" for segment in segments)
    if not _PREFIX.match(prefix):
        raise ProxyError(f"{prefix!r} cannot be a route path.")
    return prefix


def find_nginx() -> str:
    """The nginx binary on this host, or ""."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return ""


class NginxProxy:
    """Route files for nginx, and the reloads that apply them."""

    def __init__(
        self,
        conf_dir: Path,
        *,
        public_url: str,
        check_url: str,
        listen: str = "",
        nginx: str = "",
        reload_hook: Callable[[], None] | None = None,
        worker_processes: int = 2,
        grpc_host: str = "",
        grpc_public_host: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        """``listen`` and ``nginx`` for a managed nginx; ``reload_hook`` for an external one.

        ``grpc_host``: the address the router binds each deployment's gRPC port on
        (empty: no gRPC at the stable address); ``grpc_public_host``: the host clients
        use for it (default: ``grpc_host``). ``tls_cert`` and ``tls_key`` (PEM text, a
        managed nginx only): the stable address serves HTTPS, and gRPC over TLS.
        """
        if listen and not _LISTEN.match(listen):
            raise ProxyError(f"{listen!r} is not a host:port to listen on.")
        if grpc_host and not _LISTEN.match(f"{grpc_host}:1"):
            raise ProxyError(f"{grpc_host!r} is not a host to listen on for gRPC.")
        if grpc_public_host and not _LISTEN.match(f"{grpc_public_host}:1"):
            raise ProxyError(f"{grpc_public_host!r} is not a host name for gRPC clients.")
        if not listen and reload_hook is None:
            raise ProxyError("An external proxy needs a reload hook.")
        self.conf_dir = conf_dir
        self.public_url = public_url.rstrip("/")
        self.check_url = check_url.rstrip("/")
        self.listen = listen
        self.nginx = nginx or find_nginx()
        self.reload_hook = reload_hook
        self.worker_processes = max(1, worker_processes)
        self.grpc_host = grpc_host
        self.grpc_public_host = grpc_public_host or grpc_host
        if bool(tls_cert) != bool(tls_key):
            raise ProxyError("TLS at the proxy needs both a certificate and its key.")
        if tls_cert and "-----BEGIN" not in tls_cert:
            raise ProxyError("The proxy's TLS certificate is not PEM text (-----BEGIN ...).")
        if tls_key and "-----BEGIN" not in tls_key:
            raise ProxyError("The proxy's TLS key is not PEM text (-----BEGIN ...).")
        self.tls_cert = tls_cert
        self.tls_key = tls_key

    @property
    def managed(self) -> bool:
        return bool(self.listen)

    # ------------------------------------------------------------ paths
    @property
    def upstream_dir(self) -> Path:
        return self.conf_dir / "upstreams"

    @property
    def location_dir(self) -> Path:
        return self.conf_dir / "locations"

    @property
    def state_dir(self) -> Path:
        return self.conf_dir / "routes"

    @property
    def grpc_dir(self) -> Path:
        return self.conf_dir / "grpc"

    @property
    def grpc_ports_file(self) -> Path:
        return self.conf_dir / "grpc-ports.json"

    @property
    def tls(self) -> bool:
        """Whether the stable address serves TLS (HTTPS and gRPC over TLS)."""
        return bool(self.tls_cert)

    def _tls_lines(self, indent: str, *, plain_http_error: bool = True) -> str:
        if not self.tls:
            return ""
        folder = self.conf_dir / "tls"
        return (
            f"{indent}ssl_certificate {folder / 'cert.pem'};\n"
            f"{indent}ssl_certificate_key {folder / 'key.pem'};\n"
            f"{indent}ssl_protocols TLSv1.2 TLSv1.3;\n"
            + (f"{indent}error_page 497 =400 @v2_needs_https;\n" if plain_http_error else "")
        )

    def _get(self, url: str, timeout: float) -> requests.Response:
        """A check through our own proxy. Over TLS the certificate is not verified: the
        check proves the route and the instance behind it, on an address we started."""
        if not self.tls:
            return requests.get(url, timeout=timeout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return requests.get(url, timeout=timeout, verify=False)  # noqa: S501 (see above)

    @property
    def main_conf(self) -> Path:
        return self.conf_dir / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.conf_dir / "nginx.pid"

    @property
    def gateway_conf(self) -> Path:
        return self.conf_dir / "gateway.conf"

    @property
    def gateway_pid_file(self) -> Path:
        return self.conf_dir / "gateway.pid"

    def url(self, prefix: str) -> str:
        """The public URL of a route path."""
        return f"{self.public_url}{prefix}"

    def grpc_address(self, route: Route) -> str:
        """The stable gRPC address (host:port) of a route, or "" when it has none.

        gRPC paths carry no deployment (the model name is inside the message), so each
        deployment gets a port of its own; it is kept for the route's key across every
        switch, and given back only when the route is removed.
        """
        port = self._grpc_ports().get(route.key)
        if not self.grpc_host or not route.grpc_upstream or port is None:
            return ""
        host = self.grpc_public_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # ------------------------------------------------------------ routes
    def routes(self) -> dict[str, Route]:
        """The routes written now, by key."""
        found = {}
        for path in sorted(self.state_dir.glob("*.json")) if self.state_dir.is_dir() else []:
            try:
                route = Route.from_dict(json.loads(path.read_text())).check()
            except (OSError, ValueError, TypeError, ProxyError):
                continue
            found[route.key] = route
        return found

    def set_route(self, route: Route, *, timeout_s: float = 10.0) -> float:
        """Point ``route.prefix`` at ``route.upstream`` and wait until nginx serves it.

        Returns the seconds the switch took. On failure the previous route is put
        back, so the deployment keeps serving what it served.
        """
        route.check()
        started = time.monotonic()
        with self._lock():
            routes = self.routes()
            previous = routes.get(route.key)
            # A path belongs to one deployment; another key on it is a leftover (a
            # deployment deleted behind our back) and would make the config invalid.
            displaced = [r for r in routes.values() if r.prefix == route.prefix and r != previous]
            for other in displaced:
                self._delete(other.key)
            self._write(route)
            try:
                self._apply()
                self.wait_for(route, timeout_s=timeout_s)
            except ProxyError:
                self._delete(route.key)
                for other in [*displaced, *([previous] if previous else [])]:
                    self._write(other)
                with contextlib.suppress(ProxyError):
                    self._apply()
                raise
        return time.monotonic() - started

    def remove_route(self, key: str) -> None:
        """Stop routing a deployment's path (it then answers 404 at the proxy)."""
        if not _KEY.match(key):
            raise ProxyError(f"{key!r} is not a route key.")
        with self._lock():
            if key in self.routes():
                self._delete(key)
                self._apply()
            ports = self._grpc_ports()
            if ports.pop(key, None) is not None:
                _atomic_write(self.grpc_ports_file, json.dumps(ports))

    def sync(self, wanted: dict[str, Route]) -> int:
        """Make the written routes exactly ``wanted``; returns how many changed."""
        prefixes: set[str] = set()
        for route in wanted.values():
            route.check()
            if route.prefix in prefixes:
                raise ProxyError(f"Two routes want the path {route.prefix}.")
            prefixes.add(route.prefix)
        with self._lock():
            current = self.routes()
            changed = 0
            for key in set(current) - set(wanted):
                self._delete(key)
                changed += 1
            for key, route in wanted.items():
                if current.get(key) != route:
                    self._write(route)
                    changed += 1
            if changed or not self.running():
                self._apply()
        return changed

    def wait_for(self, route: Route, *, timeout_s: float = 10.0) -> None:
        """Wait until the instance answers ready through the proxy on ``route.revision``.

        Proves that nginx took the route *and* reaches the instance (in docker-compose
        they talk over a network of their own).
        """
        url = f"{self.check_url}{route.prefix}v2/health/ready"
        deadline = time.monotonic() + timeout_s
        # A managed nginx was watched until its old workers stopped accepting. An
        # external one cannot be watched: its old workers may take a new connection
        # for a moment after the reload, so every answer must agree for a while.
        settle_s = 0.0 if self.managed else 0.5
        seen, agreed_since = "", 0.0
        while time.monotonic() < deadline:
            try:
                response = self._get(url, timeout=2)
                revision = response.headers.get(REVISION_HEADER, "")
                if revision == str(route.revision) and response.status_code == 200:
                    agreed_since = agreed_since or time.monotonic()
                    if time.monotonic() - agreed_since >= settle_s:
                        return
                    time.sleep(0.01)
                    continue
                seen = f"HTTP {response.status_code} from revision {revision or 'none'}"
            except requests.RequestException as exc:
                seen = f"no answer ({type(exc).__name__})"
            agreed_since = 0.0
            time.sleep(0.02)
        raise ProxyError(
            f"The proxy did not switch {route.prefix} to revision {route.revision} within "
            f"{timeout_s:.0f} s (last: {seen or 'nothing'})."
        )

    # ------------------------------------------------------------ nginx process
    def running(self) -> bool:
        """Whether the managed gateway and router run (an external proxy is assumed to)."""
        if not self.managed:
            return True
        return self._master_pid() is not None and self._gateway_pid() is not None

    def ensure_running(self) -> None:
        """Start the managed nginx when it is not running (a no-op for an external one)."""
        if not self.managed or self.running():
            return
        with self._lock():
            if not self.running():
                self._start()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the managed nginx gracefully (it finishes the requests it holds)."""
        for find in (self._gateway_pid, self._master_pid):
            pid = find()
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and find() is not None:
                time.sleep(0.05)
            pid = find()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _apply(self) -> None:
        if not self.managed:
            assert self.reload_hook is not None
            try:
                self.reload_hook()
            except Exception as exc:  # a hook may fail in many ways; the route is restored
                raise ProxyError(f"The proxy could not be reloaded: {exc}") from exc
            return
        pid = self._master_pid()
        if pid is None or self._gateway_pid() is None:
            self._start()
            return
        self._test_config()
        before = set(_children(pid))
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            self._start()
            return
        self._wait_reloaded(pid, before)

    def _wait_reloaded(self, master: int, before: set[int], timeout_s: float = 10.0) -> None:
        """Wait until only workers on the new configuration accept connections.

        Right after a reload the old workers may still accept for a moment; until
        they say "shutting down", a request can reach the old route, so the old
        instance must not be stopped before this returns.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            workers = _children(master)
            fresh = [p for p, title in workers.items() if p not in before and _accepting(title)]
            stale = [p for p, title in workers.items() if p in before and _accepting(title)]
            if fresh and not stale:
                return
            time.sleep(0.01)
        raise ProxyError(
            "nginx did not finish reloading within "
            f"{timeout_s:.0f} s; see {self.conf_dir / 'logs' / 'error.log'}."
        )

    def _start(self) -> None:
        """Start the router, then the gateway in front of it (a half left over from a
        crash is stopped first: both are configured together)."""
        if not self.nginx:
            raise ProxyError("nginx is not installed on this host (apt-get install nginx).")
        self.stop()
        self._write_main()
        self._test_config()
        self._test_config(self.gateway_conf)
        for conf in (self.main_conf, self.gateway_conf):
            result = subprocess.run(
                [self.nginx, *self._args(conf)], capture_output=True, text=True, timeout=30
            )
            if result.returncode != 0:
                self.stop()
                raise ProxyError(f"nginx did not start: {self._tail(result.stderr)}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if self._get(f"{self.check_url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise ProxyError(f"nginx started but does not answer on {self.listen}.")

    def _test_config(self, conf: Path | None = None) -> None:
        if not self.nginx:
            raise ProxyError("nginx is not installed on this host (apt-get install nginx).")
        result = subprocess.run(
            [self.nginx, "-t", "-q", *self._args(conf or self.main_conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise ProxyError(f"nginx refused the configuration: {self._tail(result.stderr)}")

    def _args(self, conf: Path) -> list[str]:
        return [
            "-p",
            str(self.conf_dir),
            "-c",
            str(conf),
            "-e",
            str(self.conf_dir / "logs" / "error.log"),
        ]

    def _master_pid(self) -> int | None:
        """The router's master process."""
        return _nginx_pid(self.pid_file, self.main_conf)

    def _gateway_pid(self) -> int | None:
        return _nginx_pid(self.gateway_pid_file, self.gateway_conf)

    @staticmethod
    def _tail(text: str) -> str:
        return " ".join(text.strip().splitlines()[-3:])[:500]

    # ------------------------------------------------------------ files
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        with (self.conf_dir / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, route: Route) -> None:
        for folder in (self.upstream_dir, self.location_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        name = f"mp_{route.key.replace('-', '_')}"
        _atomic_write(
            self.upstream_dir / f"{route.key}.conf",
            _upstream_block(name, [(b.upstream, b.weight) for b in route.servers()]),
        )
        _atomic_write(
            self.location_dir / f"{route.key}.conf",
            f"location {route.prefix} {{\n"
            f"{REPLICATED_BUFFERING if len(route.servers()) > 1 else ''}"
            f"    proxy_pass http://{name}/;\n"
            f"    add_header {REVISION_HEADER} {route.revision} always;\n"
            "    error_page 502 503 =503 @v2_unavailable;\n"
            "    error_page 504 @v2_timeout;\n"
            "    error_page 413 @v2_too_large;\n"
            "}\n",
        )
        self._write_grpc(route, name)
        _atomic_write(self.state_dir / f"{route.key}.json", json.dumps(asdict(route)))

    def _grpc_ports(self) -> dict[str, int]:
        try:
            loaded = json.loads(self.grpc_ports_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(loaded, dict):
            return {}
        return {k: v for k, v in loaded.items() if _KEY.match(k) and isinstance(v, int)}

    def _grpc_port(self, key: str) -> int:
        """The route's gRPC port: the one it had, or a new free one (called under the lock)."""
        ports = self._grpc_ports()
        if key not in ports:
            taken = set(ports.values())
            port = free_port(self.grpc_host)
            while port in taken:
                port = free_port(self.grpc_host)
            ports[key] = port
            _atomic_write(self.grpc_ports_file, json.dumps(ports))
        return ports[key]

    def _write_grpc(self, route: Route, name: str) -> None:
        path = self.grpc_dir / f"{route.key}.conf"
        if not self.grpc_host or not route.grpc_upstream:
            path.unlink(missing_ok=True)
            return
        self.grpc_dir.mkdir(parents=True, exist_ok=True)
        host = f"[{self.grpc_host}]" if ":" in self.grpc_host else self.grpc_host
        _atomic_write(
            path,
            _upstream_block(f"{name}_grpc", [(b.grpc_upstream, b.weight) for b in route.servers()])
            + "server {\n"
            f"    listen {host}:{self._grpc_port(route.key)}{' ssl' if self.tls else ''} http2;\n"
            f"{self._tls_lines('    ', plain_http_error=False)}"
            f"{GRPC_SERVER_COMMON}"
            "    location / {\n"
            f"        grpc_pass grpc://{name}_grpc;\n"
            f"        add_header {REVISION_HEADER} {route.revision} always;\n"
            "    }\n"
            "}\n",
        )

    def _delete(self, key: str) -> None:
        for path in (
            self.upstream_dir / f"{key}.conf",
            self.location_dir / f"{key}.conf",
            self.state_dir / f"{key}.json",
            self.grpc_dir / f"{key}.conf",
        ):
            path.unlink(missing_ok=True)

    def _write_main(self) -> None:
        root = self.conf_dir
        temp = root / "temp"
        folders = (root / "logs", temp, self.upstream_dir, self.location_dir, self.state_dir)
        for folder in (*folders, self.grpc_dir):
            folder.mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            # Workers must not run as root; they only need the temporary folder.
            nobody = pwd.getpwnam("nobody")
            os.chown(temp, nobody.pw_uid, nobody.pw_gid)
            user = "user nobody nogroup;\n" if _group_exists("nogroup") else "user nobody;\n"
        if self.tls:
            (root / "tls").mkdir(mode=0o700, exist_ok=True)
            _atomic_write(root / "tls" / "cert.pem", self.tls_cert.strip() + "\n")
            _atomic_write(root / "tls" / "key.pem", self.tls_key.strip() + "\n", mode=0o600)
        router = f"127.0.0.1:{free_port('127.0.0.1')}"
        _atomic_write(self.main_conf, main_config(root, router, self.worker_processes, user))
        gateway = gateway_config(
            root, self.listen, router, self.worker_processes, user, self._tls_lines("        ")
        )
        _atomic_write(self.gateway_conf, gateway)


# With several replicas behind a route, a request whose replica dies before it answers
# (killed mid-request, or a container whose published port still accepts) must go to
# another one. nginx resends a request only if it holds the whole body, so these routes
# read bodies up to 1 MB into memory first (larger ones spill to a temporary file); a
# route to one instance streams bodies through (there is nowhere else to send them).
REPLICATED_BUFFERING = "    proxy_request_buffering on;\n    client_body_buffer_size 1m;\n"


def _upstream_block(name: str, servers: list[tuple[str, int]]) -> str:
    """An ``upstream``: one server per instance, least outstanding requests first.

    ``max_fails=0``: an instance is never taken out for a while after an error; a
    request that cannot reach one (refused, reset before an answer) goes to the next
    (``proxy_next_upstream``), and the portal removes a dead instance from the route
    within moments of its death.
    """
    lines = [f"upstream {name} {{\n"]
    if len(servers) > 1:
        lines.append("    least_conn;\n")
    for address, weight in servers:
        extra = f" weight={weight}" if weight != 1 else ""
        lines.append(f"    server {address}{extra} max_fails=0;\n")
    # Idle connections are dropped before the instance drops them (its keep-alive limit
    # is 15 s): a request sent on a connection the instance has just closed fails on
    # every replica it is resent to, and the client gets a 503.
    lines.append("    keepalive 16;\n    keepalive_timeout 10s;\n}\n")
    return "".join(lines)


def _nginx_pid(pid_file: Path, conf: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # A reused process id must not count: the master names our config on its command line.
    if b"nginx" not in cmdline or str(conf).encode() not in cmdline:
        return None
    return pid


def _children(parent: int) -> dict[int, str]:
    """The processes whose parent is ``parent``, with their titles (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != parent:
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        found[int(entry.name)] = title.strip()
    return found


def _accepting(title: str) -> bool:
    return "worker process" in title and "shutting down" not in title


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(scratch, path)
