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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from deployer.errors import DeployerError
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
class Route:
    """Send requests under ``prefix`` to ``upstream`` (host:port), serving ``revision``."""

    key: str
    prefix: str
    upstream: str
    revision: int

    def check(self) -> Route:
        """This route, if every field is in its allowlist."""
        if not _KEY.match(self.key):
            raise ProxyError(f"{self.key!r} is not a route key.")
        if not _PREFIX.match(self.prefix):
            raise ProxyError(f"{self.prefix!r} is not an allowed route path.")
        if not _UPSTREAM.match(self.upstream):
            raise ProxyError(f"{self.upstream!r} is not a host:port address.")
        if not isinstance(self.revision, int) or self.revision < 0:
            raise ProxyError("A route's revision must be a non-negative integer.")
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
    ) -> None:
        """``listen`` and ``nginx`` for a managed nginx; ``reload_hook`` for an external one."""
        if listen and not _LISTEN.match(listen):
            raise ProxyError(f"{listen!r} is not a host:port to listen on.")
        if not listen and reload_hook is None:
            raise ProxyError("An external proxy needs a reload hook.")
        self.conf_dir = conf_dir
        self.public_url = public_url.rstrip("/")
        self.check_url = check_url.rstrip("/")
        self.listen = listen
        self.nginx = nginx or find_nginx()
        self.reload_hook = reload_hook
        self.worker_processes = max(1, worker_processes)

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

    # ------------------------------------------------------------ routes
    def routes(self) -> dict[str, Route]:
        """The routes written now, by key."""
        found = {}
        for path in sorted(self.state_dir.glob("*.json")) if self.state_dir.is_dir() else []:
            try:
                route = Route(**json.loads(path.read_text())).check()
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
                response = requests.get(url, timeout=2)
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
                if requests.get(f"{self.check_url}/healthz", timeout=1).status_code == 200:
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
            f"upstream {name} {{\n"
            f"    server {route.upstream} max_fails=0;\n"
            "    keepalive 16;\n"
            "}\n",
        )
        _atomic_write(
            self.location_dir / f"{route.key}.conf",
            f"location {route.prefix} {{\n"
            f"    proxy_pass http://{name}/;\n"
            f"    add_header {REVISION_HEADER} {route.revision} always;\n"
            "}\n",
        )
        _atomic_write(self.state_dir / f"{route.key}.json", json.dumps(asdict(route)))

    def _delete(self, key: str) -> None:
        for path in (
            self.upstream_dir / f"{key}.conf",
            self.location_dir / f"{key}.conf",
            self.state_dir / f"{key}.json",
        ):
            path.unlink(missing_ok=True)

    def _write_main(self) -> None:
        root = self.conf_dir
        temp = root / "temp"
        for folder in (root / "logs", temp, self.upstream_dir, self.location_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            # Workers must not run as root; they only need the temporary folder.
            nobody = pwd.getpwnam("nobody")
            os.chown(temp, nobody.pw_uid, nobody.pw_gid)
            user = "user nobody nogroup;\n" if _group_exists("nogroup") else "user nobody;\n"
        router = f"127.0.0.1:{free_port('127.0.0.1')}"
        _atomic_write(self.main_conf, main_config(root, router, self.worker_processes, user))
        _atomic_write(
            self.gateway_conf,
            gateway_config(root, self.listen, router, self.worker_processes, user),
        )


def main_config(root: Path, listen: str, worker_processes: int, user: str = "") -> str:
    """The managed router's whole configuration (the compose proxy ships its own copy)."""
    return _config(
        root,
        "nginx.pid",
        worker_processes,
        user,
        http=f"""{HTTP_COMMON}
    include {root}/upstreams/*.conf;""",
        server=f"""        listen {listen};
{SERVER_COMMON}
        include {root}/locations/*.conf;""",
    )


def gateway_config(
    root: Path, listen: str, router: str, worker_processes: int, user: str = ""
) -> str:
    """The managed gateway's configuration: everything to the router, never reloaded."""
    return _config(
        root,
        "gateway.pid",
        worker_processes,
        user,
        http=f"""{GATEWAY_COMMON}
    upstream modelport_router {{
        server {router} max_fails=0;
    }}""",
        server=f"""        listen {listen};
        location / {{
            proxy_pass http://modelport_router;
        }}""",
    )


def _config(
    root: Path, pid: str, worker_processes: int, user: str, *, http: str, server: str
) -> str:
    temp = root / "temp"
    return f"""# Written by ModelPort; it is rewritten on every start.
{user}worker_processes {worker_processes};
pid {root}/{pid};
error_log {root}/logs/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{http}
    server {{
{server}
    }}
}}
"""


# The gateway: clients keep their connections here while the router behind reloads.
# Each request takes a new loopback connection to the router (no keep-alive there): a
# reload makes the router close its idle connections, and a request sent on one in
# that instant would fail, while a new connection always reaches a worker that
# serves it to the end.
GATEWAY_COMMON = """\
    access_log off;
    server_tokens off;
    client_max_body_size 64m;
    proxy_http_version 1.1;
    proxy_set_header Connection "close";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    proxy_next_upstream error timeout non_idempotent;
    proxy_next_upstream_tries 3;"""

HTTP_COMMON = """\
    access_log off;
    server_tokens off;
    client_max_body_size 64m;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    # An instance that is stopping closes idle keep-alive connections; retry those
    # requests on a fresh connection instead of failing them.
    proxy_next_upstream error timeout non_idempotent;
    proxy_next_upstream_tries 3;"""

SERVER_COMMON = """\
        location = /healthz {
            default_type text/plain;
            return 200 "ok\\n";
        }
        location / {
            default_type application/json;
            return 404 '{"error": "no deployment at this address"}\\n';
        }"""


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


def _atomic_write(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)
