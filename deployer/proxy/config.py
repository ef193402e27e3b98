"""The text of the managed nginx's configuration: the router, the gateway, and the
parts every route and gRPC server shares (docker-compose's files carry copies; a test
compares them)."""

from __future__ import annotations

from pathlib import Path


def main_config(root: Path, listen: str, worker_processes: int, user: str = "") -> str:
    """The managed router's whole configuration (the compose proxy ships its own copy)."""
    return _config(
        root,
        "nginx.pid",
        worker_processes,
        user,
        http=f"""{HTTP_COMMON}
    include {root}/upstreams/*.conf;
    include {root}/grpc/*.conf;""",
        server=f"""        listen {listen};
{SERVER_COMMON}
        include {root}/locations/*.conf;""",
    )


def gateway_config(
    root: Path, listen: str, router: str, worker_processes: int, user: str = "", tls: str = ""
) -> str:
    """The managed gateway's configuration: everything to the router, never reloaded.

    ``tls``: the ``ssl_*`` lines of a certificate; the gateway then speaks HTTPS only.
    """
    return _config(
        root,
        "gateway.pid",
        worker_processes,
        user,
        http=f"""{GATEWAY_COMMON}
    upstream modelport_router {{
        server {router} max_fails=0;
        keepalive 64;
    }}""",
        server=f"""        listen {listen}{" ssl" if tls else ""};
{tls}        location / {{
            proxy_pass http://modelport_router;
            error_page 502 503 =503 @v2_unavailable;
            error_page 504 @v2_timeout;
            error_page 413 @v2_too_large;
        }}
{V2_ERRORS}""",
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
# It keeps loopback connections to the router alive (a new one per request halved REST
# req/s for small bodies: 2,626 against 4,043 at 100 B, bench/serving/edge.py). A reload
# makes the router close its idle connections; a request sent on one in that instant
# gets an error before any answer, and is sent again on a fresh connection
# (proxy_next_upstream error), which always reaches a worker that serves it to the end.
GATEWAY_COMMON = """\
    access_log off;
    server_tokens off;
    client_max_body_size 64m;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    # Never after a timeout: the instance may still be running that inference, and a
    # POST must not run twice.
    proxy_next_upstream error non_idempotent;
    proxy_next_upstream_tries 3;
    # Bodies pass through as they arrive, both ways. Buffered, a body past the memory
    # buffer went to a temporary file and then out as header + file: a small last
    # segment that Nagle holds until the instance's delayed ACK, ~40 ms per request
    # for 12-75 KB bodies (measured; bench/serving/edge.py).
    proxy_request_buffering off;
    proxy_buffering off;
    client_body_buffer_size 64k;
    error_page 413 @v2_too_large;"""

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
    # requests on a fresh connection instead of failing them. Never after a timeout: the
    # instance may still be running that inference, and a POST must not run twice.
    proxy_next_upstream error non_idempotent;
    proxy_next_upstream_tries 3;
    proxy_request_buffering off;
    proxy_buffering off;
    client_body_buffer_size 64k;
    error_page 413 @v2_too_large;"""

# Answers the edge gives itself, as V2 errors ({"error": ...}) a client can parse.
V2_ERRORS = """\
        location @v2_unavailable {
            default_type application/json;
            return 503 '{"error": "no instance answers at this address; retry shortly"}\\n';
        }
        location @v2_timeout {
            default_type application/json;
            return 504 '{"error": "the instance did not answer in time; not sent again"}\\n';
        }
        location @v2_too_large {
            default_type application/json;
            return 413 '{"error": "request body too large for this address"}\\n';
        }
        location @v2_needs_https {
            default_type application/json;
            return 400 '{"error": "this address speaks HTTPS only"}\\n';
        }"""

SERVER_COMMON = f"""\
        location = /healthz {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error": "no deployment at this address"}}\\n';
        }}
{V2_ERRORS}"""

# Each deployment's gRPC server on the router: HTTP/2 without TLS (h2c). The edge's own
# answers are gRPC statuses (a trailers-only response), never an HTML page.
GRPC_SERVER_COMMON = """\
    client_max_body_size 64m;
    # nginx ends an HTTP/2 connection after 1000 calls by default; a gRPC channel lives
    # much longer (and a load generator that does not reconnect measured that cap).
    keepalive_requests 1000000;
    grpc_read_timeout 300s;
    grpc_send_timeout 300s;
    # As for REST: never resend a call after a timeout (ModelInfer may still be running).
    grpc_next_upstream error non_idempotent;
    grpc_next_upstream_tries 3;
    error_page 502 503 = @grpc_unavailable;
    error_page 504 = @grpc_timeout;
    error_page 413 = @grpc_too_large;
    location @grpc_unavailable {
        default_type application/grpc;
        add_header grpc-status 14 always;
        add_header grpc-message "no instance answers at this address; retry shortly" always;
        return 200;
    }
    location @grpc_timeout {
        default_type application/grpc;
        add_header grpc-status 4 always;
        add_header grpc-message "the instance did not answer in time; not sent again" always;
        return 200;
    }
    location @grpc_too_large {
        default_type application/grpc;
        add_header grpc-status 8 always;
        add_header grpc-message "request too large for this address" always;
        return 200;
    }
"""
