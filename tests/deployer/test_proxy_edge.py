"""The stable address with real serving instances: gRPC, no stall, the edge's own answers."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from bench.serving.edge import build_sum, rest_body
from deployer.proxy import REVISION_HEADER, NginxProxy, Route, find_nginx, route_prefix
from tests.conftest import free_port, require
from tests.deployer.serving.conftest import ServingProcess

PREFIX = route_prefix("acme", "sum", "production")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_sum(tmp_path / "sum.onnx")


@pytest.fixture
def instances(model: Path) -> Iterator[list[ServingProcess]]:
    started = [ServingProcess(model, "sum", grpc=True) for _ in range(2)]
    for server in started:
        server.wait_ready()
    yield started
    for server in started:
        server.terminate()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[NginxProxy]:
    require("nginx", bool(find_nginx()), "apt-get install nginx (make test does)")
    listen = f"127.0.0.1:{free_port()}"
    url = f"http://{listen}"
    # A private folder (0700, as tmp_path is) must not stop the workers: bodies never
    # go to temporary files any more.
    managed = NginxProxy(
        tmp_path / "proxy", public_url=url, check_url=url, listen=listen, grpc_host="127.0.0.1"
    )
    managed.ensure_running()
    yield managed
    managed.stop()


def _route(server: ServingProcess, revision: int) -> Route:
    return Route(
        "d1",
        PREFIX,
        f"127.0.0.1:{server.http_port}",
        revision,
        grpc_upstream=f"127.0.0.1:{server.grpc_port}",
    )


def _p50_ms(url: str, size: int, count: int = 25) -> float:
    body, ctype, headers = rest_body(size)
    session = requests.Session()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": ctype, **headers})
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return statistics.median(times) * 1000


@pytest.mark.parametrize("size", [12_000, 63_000, 1_000_000])
def test_mid_size_bodies_cost_no_stall_through_the_stable_address(
    proxy: NginxProxy, instances: list[ServingProcess], size: int
) -> None:
    """Buffered, a 12-75 KB body waited ~44 ms between router and instance (Nagle
    against delayed ACK); now it costs about what the instance's own port costs."""
    server = instances[0]
    proxy.set_route(_route(server, 1))
    direct = _p50_ms(f"{server.url}/v2/models/sum/infer", size)
    stable = _p50_ms(f"{proxy.url(PREFIX)}v2/models/sum/infer", size)
    assert stable < direct + 5, (direct, stable)


def test_the_edge_answers_v2_json_errors(proxy: NginxProxy) -> None:
    missing = requests.get(proxy.url("/acme/none/production/") + "v2/models/x", timeout=5)
    assert missing.status_code == 404
    assert "no deployment" in missing.json()["error"]

    # An instance that died after its switch: the route is written without the switch's check.
    proxy._write(Route("d1", PREFIX, f"127.0.0.1:{free_port()}", 1))
    proxy._apply()
    gone = requests.post(proxy.url(PREFIX) + "v2/models/sum/infer", data=b"{}", timeout=10)
    assert gone.status_code == 503
    assert gone.headers["Content-Type"] == "application/json"
    assert "no instance" in gone.json()["error"]

    host, port = proxy.listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"POST {PREFIX}v2/models/sum/infer HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n".encode()
        )
        answer = sock.recv(65536).decode()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert "too large" in json.loads(body)["error"]


def test_tritonclient_grpc_works_at_the_stable_address(
    proxy: NginxProxy, instances: list[ServingProcess]
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    proxy.set_route(_route(instances[0], 7))
    address = proxy.grpc_address(_route(instances[0], 7))
    assert address.startswith("127.0.0.1:")
    client = grpcclient.InferenceServerClient(address)
    assert client.is_model_ready("sum")
    x = np.arange(1000, dtype=np.float32).reshape(1, -1)
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("sum", [tensor])
    assert float(result.as_numpy("y")[0, 0]) == pytest.approx(float(x.sum()))
    # The address is the deployment's: a switch keeps it.
    proxy.set_route(_route(instances[1], 8))
    assert proxy.grpc_address(_route(instances[1], 8)) == address
    assert REVISION_HEADER.lower() in {k.lower() for k in _grpc_initial_metadata(address)}
    client.close()


def _grpc_initial_metadata(address: str) -> dict[str, str]:
    import grpc

    from deployer.serving.proto import load

    pb = load()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        _, info = call.with_call(pb.ServerLiveRequest(), timeout=5)
        return dict(info.initial_metadata())


def test_the_edge_answers_grpc_statuses(proxy: NginxProxy) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    dead = Route("d1", PREFIX, f"127.0.0.1:{free_port()}", 1, f"127.0.0.1:{free_port()}")
    proxy._write(dead)
    proxy._apply()
    client = grpcclient.InferenceServerClient(proxy.grpc_address(dead))
    with pytest.raises(InferenceServerException) as failure:
        client.get_model_metadata("sum")
    assert failure.value.status() == "StatusCode.UNAVAILABLE"
    assert "no instance answers" in str(failure.value.message())
    client.close()


def test_grpc_switches_under_load_drop_no_call(
    proxy: NginxProxy, instances: list[ServingProcess]
) -> None:
    """tritonclient.grpc clients keep their HTTP/2 connections while the route switches
    back and forth (a rollout, then a rollback, 30 times): not one call fails."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    one, two = instances
    proxy.set_route(_route(one, 1))
    address = proxy.grpc_address(_route(one, 1))
    x = np.ones((1, 256), dtype=np.float32)
    stop = threading.Event()
    sent, failures = [0], []
    lock = threading.Lock()

    def client() -> None:
        triton = grpcclient.InferenceServerClient(address)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                result = triton.infer("sum", [tensor], client_timeout=10)
                outcome = "" if float(result.as_numpy("y")[0, 0]) == 256.0 else "wrong answer"
            except Exception as exc:  # every failure counts, whatever it is
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                sent[0] += 1
                if outcome:
                    failures.append(outcome)
            time.sleep(0.005)
        triton.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    for index in range(30):
        proxy.set_route(_route((two, one)[index % 2], index + 2))
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    assert sent[0] > 300
    assert failures == []


def _self_signed(folder: Path) -> tuple[str, str, Path]:
    """A certificate for 127.0.0.1 and localhost, made here: (cert PEM, key PEM, cert file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = folder / "ca.pem"
    path.write_text(cert_pem)
    return cert_pem, key_pem, path


def test_with_a_certificate_the_stable_address_serves_https_and_grpc_over_tls(
    tmp_path: Path, instances: list[ServingProcess]
) -> None:
    require("nginx", bool(find_nginx()), "apt-get install nginx (make test does)")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    cert, key, ca = _self_signed(tmp_path)
    listen = f"127.0.0.1:{free_port()}"
    url = f"https://{listen}"
    proxy = NginxProxy(
        tmp_path / "proxy",
        public_url=url,
        check_url=url,
        listen=listen,
        grpc_host="127.0.0.1",
        tls_cert=cert,
        tls_key=key,
    )
    try:
        proxy.ensure_running()
        route = _route(instances[0], 3)
        proxy.set_route(route)
        ready = requests.get(f"{proxy.url(PREFIX)}v2/health/ready", verify=str(ca), timeout=5)
        assert ready.status_code == 200
        assert ready.headers[REVISION_HEADER] == "3"
        plain_http = requests.get(f"http://{listen}{PREFIX}v2/health/ready", timeout=5)
        assert plain_http.status_code == 400
        assert "HTTPS" in plain_http.json()["error"]

        client = grpcclient.InferenceServerClient(
            proxy.grpc_address(route), ssl=True, root_certificates=str(ca)
        )
        x = np.ones((1, 10), dtype=np.float32)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        assert float(client.infer("sum", [tensor]).as_numpy("y")[0, 0]) == 10.0
        client.close()
        plain = grpcclient.InferenceServerClient(proxy.grpc_address(route))
        with pytest.raises(Exception, match=r"(?i)unavailable"):
            plain.is_server_live(client_timeout=5)
        plain.close()
        assert (proxy.conf_dir / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    ("cert", "key", "problem"),
    [("-----BEGIN CERTIFICATE-----", "", "both"), ("not pem", "-----BEGIN KEY", "not PEM")],
)
def test_a_half_or_malformed_tls_setting_is_refused(
    tmp_path: Path, cert: str, key: str, problem: str
) -> None:
    from deployer.proxy import ProxyError

    with pytest.raises(ProxyError, match=problem):
        NginxProxy(
            tmp_path, public_url="https://x", check_url="https://x", listen="127.0.0.1:1",
            tls_cert=cert, tls_key=key,
        )  # fmt: skip


def test_an_oversized_grpc_message_gets_a_grpc_status(
    proxy: NginxProxy, instances: list[ServingProcess]
) -> None:
    import grpc

    from deployer.serving.proto import load

    pb = load()
    proxy.set_route(_route(instances[0], 1))
    request = pb.ModelInferRequest(model_name="sum")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 17 * 1024 * 1024])
    request.raw_input_contents.append(b"\0" * (68 * 1024 * 1024))  # over the 64 MB limit
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(proxy.grpc_address(_route(instances[0], 1)), options) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as failure:
            call(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The edge streams the body on, so whichever limit sees it first answers: the edge's
    # own ("too large") or the instance's grpcio server ("larger than max").
    details = failure.value.details() or ""
    assert "too large" in details or "larger than max" in details, details
