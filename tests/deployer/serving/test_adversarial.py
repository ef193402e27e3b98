"""Attacks on real sockets against both listeners of one real serving process.

For every attack: the process stays up, its RSS (from /proc of the serving subprocess)
stays bounded before, during and after, and a well-behaved client running alongside keeps
getting right answers. The figures are printed at the end (and kept in the README).
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServingProcess
from hpack import Decoder, Encoder
from serving_onnx_models import mlp, mlp_reference

from deployer.serving.proto import load

MAX_CONNECTIONS = 48
MAX_QUEUE = 4
MAX_STREAMS = 16
RSS_GROWTH_LIMIT_MIB = 150
INFER = "/v2/models/m/infer"
GRPC_INFER = b"/inference.GRPCInferenceService/ModelInfer"
RESULTS: list[dict[str, object]] = []


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class GoodClient:
    """A well-behaved client: REST and gRPC inferences in a loop, answers checked."""

    def __init__(self, server: ServingProcess, layers: list) -> None:
        self.server = server
        self.x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
        self.expected = mlp_reference(layers, self.x)
        self.ok = 0
        self.grpc_ok = 0
        self.deferred = 0  # 503/RESOURCE_EXHAUSTED, retried after Retry-After like a good client
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        body = {
            "inputs": [
                {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": self.x.tolist()}
            ]
        }
        self.body = json.dumps(body)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{self.server.grpc_port}")
        inp = grpcclient.InferInput("input", [1, 16], "FP32")
        inp.set_data_from_numpy(self.x)
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", self.server.http_port, timeout=10
                    )
                conn.request("POST", INFER, body=self.body)
                response = conn.getresponse()
                data = response.read()
                if response.status == 503 and response.getheader("retry-after"):
                    self.deferred += 1
                elif response.status != 200:
                    self.wrong.append(f"REST {response.status} {data[:200]!r}")
                else:
                    got = np.array(json.loads(data)["outputs"][0]["data"], dtype=np.float32)
                    if not np.allclose(got, self.expected.ravel(), rtol=1e-5):
                        self.wrong.append("REST wrong answer")
                    else:
                        self.ok += 1
            except (OSError, http.client.HTTPException) as exc:
                self.wrong.append(f"REST {type(exc).__name__}: {exc}")
                conn = None
            try:
                out = grpc.infer("m", [inp], client_timeout=10).as_numpy("output")
                if np.allclose(out, self.expected, rtol=1e-5):
                    self.ok += 1
                    self.grpc_ok += 1
                else:
                    self.wrong.append("gRPC wrong answer")
            except Exception as exc:
                if "RESOURCE_EXHAUSTED" in str(exc):
                    self.deferred += 1
                else:
                    self.wrong.append(f"gRPC {exc}")
            self._stop.wait(0.01)
        if conn is not None:
            conn.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServingProcess, GoodClient]]:
    tmp = tmp_path_factory.mktemp("adversarial")
    path, layers = mlp(tmp / "m.onnx")
    server = ServingProcess(
        path,
        "m",
        "--max-batch-size",
        "1",
        "--max-queue-depth",
        str(MAX_QUEUE),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--max-url-bytes",
        "4096",
        "--max-header-bytes",
        "8192",
        "--header-timeout-s",
        "1",
        "--keepalive-timeout-s",
        "2",
        "--max-body-bytes",
        str(1024 * 1024),
        "--grpc-max-concurrent-streams",
        str(MAX_STREAMS),
        "--grpc-max-metadata-bytes",
        "8192",
        "--no-access-log",
        grpc=True,
    )
    server.wait_ready()
    good = GoodClient(server, layers)
    good.start()
    yield server, good
    good.stop()
    server.terminate()


def attack(target: tuple[ServingProcess, GoodClient], name: str, fn: Callable[[], None]) -> None:
    """Run `fn` against the live server and check it survived with bounded memory."""
    server, good = target
    pid = server.proc.pid
    before = rss_mib(pid)
    ok_before, wrong_before = good.ok, len(good.wrong)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - started
    time.sleep(0.3)  # the good client gets a few more turns after the attack
    after = rss_mib(pid)
    assert server.proc.poll() is None, f"{name}: the server died"
    wrong = good.wrong[wrong_before:]
    RESULTS.append(
        {
            "attack": name,
            "s": round(elapsed, 2),
            "rss_before": round(before, 1),
            "rss_peak": round(peak[0], 1),
            "rss_after": round(after, 1),
            "good_ok": good.ok - ok_before,
            "good_wrong": len(wrong),
        }
    )
    assert not wrong, f"{name}: the well-behaved client got {wrong[:3]}"
    assert good.ok > ok_before, f"{name}: the well-behaved client got no answer"
    assert peak[0] - before < RSS_GROWTH_LIMIT_MIB, f"{name}: RSS {before} -> {peak[0]} MiB"


# --- helpers for raw sockets ---


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def send_all_or_reset(sock: socket.socket, chunks: Iterator[bytes]) -> None:
    """Send until the server stops listening to us (it may close mid-way)."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass


def read_until_close(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return frame(kind, flags, stream, payload) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0)


def grpc_headers(encoder: Encoder, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    return encoder.encode(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", GRPC_INFER),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *(extra or []),
        ]
    )


def _hpack_int(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = [flags | limit]
    value -= limit
    while value >= 128:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def huffman_x_header(name: bytes, count: int) -> bytes:
    """A literal header whose value is `count` Huffman-coded 'x' (hpack's encoder is slow)."""
    bits = "1111001" * count  # 'x' in the HPACK Huffman code
    bits += "1" * (-len(bits) % 8)  # EOS padding
    value = int(bits, 2).to_bytes(len(bits) // 8, "big")
    return (
        b"\x00"
        + _hpack_int(len(name), 7, 0)
        + name
        + _hpack_int(len(value), 7, 0x80)  # H bit: Huffman-coded
        + value
    )


def grpc_message() -> bytes:
    pb = load()
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 16])
    del tensor
    request.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
    body = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def frames_seen(sock: socket.socket, seconds: float) -> dict[int, int]:
    """Count the frame types the server sends until it closes or `seconds` pass."""
    sock.settimeout(0.2)
    counts: dict[int, int] = {}
    buffer = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:
            counts[-1] = 1
            break
        if not chunk:
            counts[-1] = 1  # closed
            break
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            counts[buffer[3]] = counts.get(buffer[3], 0) + 1
            buffer = buffer[9 + length :]
    return counts


GOAWAY, RST_STREAM, CLOSED = 7, 3, -1


# --- REST attacks ---


def test_rest_huge_url_is_refused_with_414(target) -> None:
    def run() -> None:
        with connect(target[0].http_port) as sock:
            chunk = b"a" * 65536
            send_all_or_reset(sock, (b"GET /" if i == 0 else chunk for i in range(3000)))
            reply = read_until_close(sock)
        assert reply.startswith(b"HTTP/1.1 414"), reply[:100]

    attack(target, "REST endless URL (190 MiB offered; server stops reading at 4 KiB)", run)


def test_rest_huge_header_and_many_headers_get_431(target) -> None:
    def run() -> None:
        with connect(target[0].http_port) as sock:
            head = b"GET /v2/health/live HTTP/1.1\r\nX-Big: "
            send_all_or_reset(sock, (head if i == 0 else b"b" * 65536 for i in range(200)))
            assert read_until_close(sock).startswith(b"HTTP/1.1 431")
        with connect(target[0].http_port) as sock:
            lines = b"".join(b"X-%d: v\r\n" % i for i in range(20000))
            send_all_or_reset(sock, iter([b"GET /v2/health/live HTTP/1.1\r\n", lines, b"\r\n"]))
            assert read_until_close(sock).startswith(b"HTTP/1.1 431")

    attack(target, "REST 12 MiB header line; 20,000 headers", run)


def test_rest_slowloris_and_idle_connections_are_closed(target) -> None:
    def run() -> None:
        slow = [connect(target[0].http_port) for _ in range(15)]
        idle = [connect(target[0].http_port) for _ in range(15)]
        for sock in slow:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        started = time.monotonic()
        closed_at: dict[int, float] = {}
        while time.monotonic() - started < 6 and len(closed_at) < 30:
            for index, sock in enumerate(slow + idle):
                if index in closed_at:
                    continue
                try:
                    if index < 15:
                        sock.sendall(b"X: y\r\n")  # one header line at a time, never finishing
                    sock.settimeout(0.01)
                    data = sock.recv(65536)
                    if not data or data.startswith(b"HTTP/1.1 408"):
                        closed_at[index] = time.monotonic() - started
                except TimeoutError:
                    pass
                except OSError:
                    closed_at[index] = time.monotonic() - started
            time.sleep(0.3)
        for sock in slow + idle:
            sock.close()
        assert len(closed_at) == 30, f"still open: {30 - len(closed_at)}"
        assert max(closed_at.values()) < 5

    attack(target, "REST slowloris x15 + idle x15 (header 1 s, keep-alive 2 s)", run)


def test_rest_connection_cap_refuses_with_503(target) -> None:
    def run() -> None:
        socks = [connect(target[0].http_port) for _ in range(MAX_CONNECTIONS + 20)]
        refused = 0
        for sock in socks:
            sock.settimeout(0.5)
            try:
                if sock.recv(4096).startswith(b"HTTP/1.1 503"):
                    refused += 1
            except TimeoutError:
                pass
        for sock in socks:
            sock.close()
        assert refused >= 20

    attack(target, f"REST {MAX_CONNECTIONS + 20} connections (cap {MAX_CONNECTIONS})", run)


def test_rest_pipelined_continue_and_errors_stay_in_order(target) -> None:
    server, good = target
    body = good.body.encode()

    def run() -> None:
        with connect(server.http_port) as sock:
            sock.sendall(
                b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            sock.settimeout(5)
            first = b""
            while b"100 Continue" not in first:
                first += sock.recv(65536)
            assert first.index(b"200 OK") < first.index(b"100 Continue")
            sock.sendall(body)
            rest = b""
            while b'"outputs"' not in rest:
                rest += sock.recv(65536)
        with connect(server.http_port) as sock:
            sock.sendall(
                b"POST "
                + INFER.encode()
                + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
                + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"BAD\x01REQUEST\r\n\r\n"
            )
            reply = read_until_close(sock)
        statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
        assert statuses == [200, 200, 400], reply

    attack(target, "REST pipelined Expect: 100-continue, and an error after pipelined work", run)


def test_rest_malformed_requests_and_bodies_get_4xx(target) -> None:
    server, _ = target
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    cases: list[tuple[bytes, int]] = [
        (b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope", 400),
        (b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", 400),
        (b'POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 13\r\n\r\n{"inputs": 1}', 400),
        # Answered, then closed: "protocol upgrades are not supported".
        (b"GET /v2/models/m HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", 200),
        (
            b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb,
            413,
        ),
        (b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # a TLS hello
    ]

    def run() -> None:
        for request, status in cases:
            with connect(server.http_port) as sock:
                send_all_or_reset(sock, iter([request]))
                reply = read_until_close(sock, limit=65536)
            assert reply.startswith(b"HTTP/1.1 %d" % status), (request[:60], reply[:120])

    attack(target, "REST malformed: bad JSON, length, chunking, upgrade, gzip bomb, TLS", run)


def test_rest_full_batch_queue_answers_503_with_retry_after(target) -> None:
    server, good = target
    one = (
        b"POST "
        + INFER.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(good.body)
        + good.body.encode()
    )

    def run() -> None:
        with connect(server.http_port) as sock:
            sock.sendall(one * 100 + b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
            reply = read_until_close(sock, limit=1 << 24)
        heads = list(reply.split(b"HTTP/1.1 ")[1:])
        assert len(heads) == 101
        rejected = [h for h in heads if h.startswith(b"503")]
        assert rejected, "the queue never filled"
        assert all(b"retry-after: 1" in h for h in rejected)
        assert sum(h.startswith(b"200") for h in heads) >= MAX_QUEUE

    attack(target, f"REST 100 pipelined inferences (queue depth {MAX_QUEUE})", run)


# --- gRPC attacks ---


def test_grpc_streams_over_the_advertised_limit_are_refused(target) -> None:
    def run() -> None:
        encoder = Encoder()
        with connect(target[0].grpc_port) as sock:
            frames = [PREFACE]
            for index in range(5000):
                frames.append(h2_frame(1, 0x4, 1 + 2 * index, grpc_headers(encoder)))
            send_all_or_reset(sock, iter([b"".join(frames)]))
            seen = frames_seen(sock, 3)
        refused = seen.get(RST_STREAM, 0)
        assert refused >= 5000 - MAX_STREAMS or GOAWAY in seen, seen

    attack(target, f"gRPC 5,000 open streams on one connection (limit {MAX_STREAMS})", run)


def test_grpc_huge_header_in_one_frame_and_in_continuations(target) -> None:
    def run() -> None:
        big = huffman_x_header(b"x-big", 1024 * 1024)
        for split in (False, True):
            block = grpc_headers(Encoder()) + big
            with connect(target[0].grpc_port) as sock:
                if split:
                    parts = [block[i : i + 16384] for i in range(0, len(block), 16384)]
                    payload = h2_frame(1, 0, 1, parts[0])
                    payload += b"".join(h2_frame(9, 0, 1, part) for part in parts[1:-1])
                    payload += h2_frame(9, 0x4, 1, parts[-1])
                else:
                    payload = h2_frame(1, 0x4, 1, block)
                started = time.monotonic()
                send_all_or_reset(sock, iter([PREFACE + payload]))
                seen = frames_seen(sock, 3)
                assert time.monotonic() - started < 3.5
            assert 0 not in seen, f"the oversized call was served: {seen}"  # no DATA answer

    attack(target, "gRPC 1 MiB Huffman-coded header: one HEADERS frame, and CONTINUATIONs", run)


def test_grpc_rapid_reset_drops_the_work(target) -> None:
    server, _ = target

    def inference_count() -> int:
        _, stats = server.json("GET", "/v2/models/m/stats")
        return int(stats["model_stats"][0]["inference_count"])

    def run() -> None:
        message = grpc_message()
        before = inference_count()
        encoder = Encoder()
        with connect(server.grpc_port) as sock:
            sock.sendall(PREFACE)
            for batch in range(20):
                frames = []
                for index in range(100):
                    stream = 1 + 2 * (batch * 100 + index)
                    frames.append(h2_frame(1, 0x4, stream, grpc_headers(encoder)))
                    frames.append(h2_frame(0, 0x1, stream, message))
                    frames.append(h2_frame(3, 0, stream, struct.pack(">I", 8)))  # CANCEL
                send_all_or_reset(sock, iter([b"".join(frames)]))
            frames_seen(sock, 1)
        ran = inference_count() - before
        RESULTS.append(
            {
                "attack": "rapid reset: inferences run meanwhile (incl. the good client's)",
                "ran": ran,
            }
        )

    attack(target, "gRPC rapid reset: 2,000 x (HEADERS, DATA, RST_STREAM)", run)


def test_grpc_flow_control_blast_is_bounded(target) -> None:
    def run() -> None:
        encoder = Encoder()
        chunk = b"\0" * 16384
        with connect(target[0].grpc_port) as sock:
            frames = [PREFACE]
            for index in range(40):
                stream = 1 + 2 * index
                frames.append(h2_frame(1, 0x4, stream, grpc_headers(encoder)))
                prefix = b"\x00" + struct.pack(">I", 8 * 1024 * 1024)
                frames.append(h2_frame(0, 0, stream, prefix))
            sock.sendall(b"".join(frames))
            # 40 streams x 2 MiB each, sent without waiting for any WINDOW_UPDATE.
            blast = b"".join(h2_frame(0, 0, 1 + 2 * (i % 40), chunk) for i in range(5120))
            sock.settimeout(5)
            send_all_or_reset(sock, iter([blast]))
            seen = frames_seen(sock, 2)
        assert GOAWAY in seen or CLOSED in seen or seen.get(RST_STREAM), seen

    attack(target, "gRPC 80 MiB over 40 streams ignoring flow control", run)


def test_grpc_malformed_frames_and_garbage(target) -> None:
    port = target[0].grpc_port
    junk = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
        b"PRI * HTTP",
        PREFACE + h2_frame(1, 0x4, 2, b"\x82"),  # even stream id from a client
        PREFACE + h2_frame(0, 0, 0, b"data on stream 0"),
        PREFACE + h2_frame(4, 0, 0, b"\x00\x04\xff\xff\xff\xff"),  # window over 2^31-1
        PREFACE + h2_frame(1, 0x4, 1, b"\xff\xff\xff\xff\xff"),  # undecodable HPACK
        PREFACE + frame(0, 0, 1, b"") + b"\x00\x00",  # a frame cut short
    ]

    def run() -> None:
        for data in junk:
            with connect(port, timeout=3) as sock:
                send_all_or_reset(sock, iter([data]))
                frames_seen(sock, 1)

    attack(target, "gRPC malformed: HTTP/1, bad preface, bad frames, bad HPACK", run)


def grpc_trailers(sock: socket.socket, seconds: float) -> dict[bytes, bytes]:
    """Decode the header blocks the server sends on stream 1 until it ends the stream."""
    sock.settimeout(0.2)
    decoder = Decoder()
    headers: dict[bytes, bytes] = {}
    buffer = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload = buffer[9 : 9 + length]
            buffer = buffer[9 + length :]
            if kind == 1 and stream == 1:  # HEADERS (grpc-core sends no padding/priority)
                headers.update(dict(decoder.decode(payload, raw=True)))
                if flags & 0x1:  # END_STREAM: these were the trailers
                    return headers
            elif kind == 3 and stream == 1:  # RST_STREAM
                return headers
    return headers


def test_grpc_connection_flood_and_deadlines(target) -> None:
    server, good = target
    recovered_in: list[float] = []
    trailers: dict[bytes, bytes] = {}

    def served_after_flood(client: grpcclient.InferenceServerClient) -> float:
        """Seconds until a new client is served; a refusal meanwhile is UNAVAILABLE."""
        inp = grpcclient.InferInput("input", [1, 16], "FP32")
        inp.set_data_from_numpy(good.x)
        started = time.monotonic()
        errors: list[str] = []
        while time.monotonic() - started < 5:
            try:
                out = client.infer("m", [inp], client_timeout=5).as_numpy("output")
            except Exception as exc:  # refused while grpcio frees the flood's slots
                errors.append(str(exc))
                time.sleep(0.05)
                continue
            assert np.allclose(out, good.expected, rtol=1e-5)
            assert all("UNAVAILABLE" in error for error in errors), errors[:3]
            return time.monotonic() - started
        raise AssertionError(f"not served 5 s after the flood: {errors[-1:]}")

    def run() -> None:
        # the well-behaved client holds its connection from before the flood: it must
        # keep being served while new connections over the cap are refused
        while good.grpc_ok == 0:
            time.sleep(0.05)
        socks = [connect(server.grpc_port) for _ in range(MAX_CONNECTIONS + 30)]
        for sock in socks:
            send_all_or_reset(sock, iter([PREFACE]))
        time.sleep(0.5)
        for sock in socks:
            sock.close()
        # grpcio frees connection slots lazily after the peers leave: a new client may be
        # refused (UNAVAILABLE) for a moment, and must be served again within seconds
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
        recovered_in.append(served_after_flood(client))
        client.close()
        # a call whose grpc-timeout (20 ms) passes while its client is still sending gets
        # DEADLINE_EXCEEDED, not an answer (sent raw: client libraries race their own timer)
        sock = connect(server.grpc_port)
        headers = grpc_headers(Encoder(), [(b"grpc-timeout", b"20m")])
        sock.sendall(PREFACE + h2_frame(1, 0x4, 1, headers))  # HEADERS, END_HEADERS
        time.sleep(0.2)
        send_all_or_reset(sock, iter([h2_frame(0, 0x1, 1, grpc_message())]))  # DATA, END_STREAM
        trailers.update(grpc_trailers(sock, 5.0))
        sock.close()

    attack(target, f"gRPC {MAX_CONNECTIONS + 30} connections; a 20 ms grpc-timeout", run)
    assert recovered_in
    assert recovered_in[0] < 5
    assert trailers.get(b"grpc-status") == b"4", trailers  # DEADLINE_EXCEEDED


def test_zz_print_figures(target, capsys: pytest.CaptureFixture[str]) -> None:
    server, good = target
    attacks = [r for r in RESULTS if "rss_peak" in r]
    with capsys.disabled():
        print("\nadversarial suite:")
        for row in RESULTS:
            print("  " + json.dumps(row))
        peak = max(float(r["rss_peak"]) for r in attacks)  # type: ignore[arg-type]
        print(
            f"  attacks tried {len(attacks)}, survived {len(attacks)}, peak RSS {peak:.0f} MiB, "
            f"well-behaved answers {good.ok} right, {len(good.wrong)} wrong"
        )
    assert server.proc.poll() is None
    assert not good.wrong
