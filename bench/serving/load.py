"""Closed-loop load: wrk (REST JSON and binary bodies) and a multi-process gRPC client."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WRK = shutil.which("wrk") or "/usr/bin/wrk"
H2LOAD = shutil.which("h2load")


@dataclass
class LoadResult:
    """Throughput and latency of one closed-loop run."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int


# ---- request bodies -------------------------------------------------------------------------


def _floats(x: np.ndarray) -> str:
    # float32 values written with 9 significant digits: exact for float32, and the length
    # a numpy-based client sends (json.dumps of float64 repr would be ~17 digits).
    return "[" + ",".join(f"{v:.9g}" for v in x.reshape(-1).tolist()) + "]"


def v2_json_body(input_name: str, x: np.ndarray) -> bytes:
    return (
        f'{{"inputs":[{{"name":"{input_name}","shape":{json.dumps(list(x.shape))},"datatype":"FP32","data":{_floats(x)}}}]}}'
    ).encode()


def mlflow_json_body(x: np.ndarray, key: str = "inputs") -> bytes:
    """``{key: nested list}``: mlflow's "inputs" format, and BentoML's ``{"x": ...}``."""
    # Send the tensor with its batch axis.
    nested = x.tolist()
    text = json.dumps({key: nested})
    # Shorten floats the same way as for V2 bodies so both parse the same digits.
    text = re.sub(r"-?\d+\.\d+(?:e[-+]?\d+)?", lambda m: f"{float(m.group()):.9g}", text)
    return text.encode()


def v2_binary_body(input_name: str, x: np.ndarray, output_name: str) -> tuple[bytes, int]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    return header + raw, len(header)


def grpc_request_bytes(pb, model: str, input_name: str, x: np.ndarray, raw: bool = True) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request.SerializeToString()


# ---- wrk ------------------------------------------------------------------------------------

_LUA = """
local f = assert(io.open("{body}", "rb"))
local body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "{content_type}"
{extra}
"""


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group())
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    if text.endswith("s"):
        return value * 1000
    return value


def run_wrk(
    url: str,
    body: bytes,
    concurrency: int,
    duration_s: float,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
        script = Path(tmp) / "post.lua"
        script.write_text(_LUA.format(body=body_path, content_type=content_type, extra=extra))
        threads = min(2, concurrency)
        command = [
            WRK,
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=duration_s + 60
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    dist = re.search(
        r"Latency Distribution\s+50%\s+(\S+)\s+75%\s+(\S+)\s+90%\s+(\S+)\s+99%\s+(\S+)", out
    )
    p50, p99 = _ms(dist.group(1)), _ms(dist.group(4))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(v) for v in socket_errors.groups())
    # Failed requests do not count as throughput.
    good_rps = rps * (total - errors) / total if total else 0.0
    return LoadResult(good_rps, p50, p99, errors, total)


# ---- gRPC -----------------------------------------------------------------------------------

_METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def _grpc_worker_main(target: str, payload: bytes, streams: int, duration_s: float):
    import grpc

    async with grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
        ],
    ) as channel:
        call = channel.unary_unary(_METHOD)  # bytes in, bytes out: no client-side protobuf work
        await call(payload, timeout=60)
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + duration_s

        async def loop() -> None:
            nonlocal errors
            while True:
                start = time.perf_counter()
                if start >= stop_at:
                    return
                try:
                    await call(payload, timeout=60)
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(streams)))
        elapsed = time.perf_counter() - began
    return np.array(latencies, dtype=np.float64), errors, elapsed


def _grpc_process(target: str, payload: bytes, streams: int, duration_s: float, queue) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    latencies, errors, elapsed = asyncio.run(
        _grpc_worker_main(target, payload, streams, duration_s)
    )
    queue.put((latencies.tobytes(), errors, elapsed))


def run_grpc(target: str, payload: bytes, concurrency: int, duration_s: float) -> LoadResult:
    """Closed loop over gRPC from up to 2 client processes (this machine has 2 cores)."""
    processes = 1 if concurrency < 8 else 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shares = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    workers = [
        ctx.Process(target=_grpc_process, args=(target, payload, share, duration_s, queue))
        for share in shares
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=duration_s + 120) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = np.concatenate([np.frombuffer(r[0], dtype=np.float64) for r in results])
    errors = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    if latencies.size == 0:
        return LoadResult(0.0, float("nan"), float("nan"), errors, errors)
    return LoadResult(
        latencies.size / elapsed,
        float(np.percentile(latencies, 50) * 1000),
        float(np.percentile(latencies, 99) * 1000),
        errors,
        latencies.size + errors,
    )


def run_h2load(target: str, payload: bytes, concurrency: int, duration_s: float) -> LoadResult:
    """Closed loop over gRPC with h2load (nghttp2): one stream at a time per connection.

    h2load is C, so the client costs the 2-core machine far less CPU than a Python gRPC
    client would. It sees HTTP status only, not grpc-status: answers are checked for
    correctness before each server is measured.
    """
    if H2LOAD is None:
        raise RuntimeError("h2load not found (apt-get install nghttp2-client)")
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(b"\x00" + struct.pack(">I", len(payload)) + payload)
        log = Path(tmp) / "log.tsv"
        command = [
            H2LOAD,
            f"-c{concurrency}",
            "-m1",
            f"-t{min(2, concurrency)}",
            f"-D{max(1, round(duration_s))}",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log}",
            f"http://{target}/inference.GRPCInferenceService/ModelInfer",
        ]
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=duration_s + 60
        ).stdout
        rows = np.loadtxt(log, dtype=np.int64, ndmin=2) if log.stat().st_size else np.empty((0, 3))
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    if rows.size == 0:
        return LoadResult(0.0, float("nan"), float("nan"), 0, 0)
    ok = rows[:, 1] == 200
    latencies_ms = rows[ok, 2] / 1000
    errors = int((~ok).sum())
    return LoadResult(
        float(ok.sum()) / elapsed,
        float(np.percentile(latencies_ms, 50)) if latencies_ms.size else float("nan"),
        float(np.percentile(latencies_ms, 99)) if latencies_ms.size else float("nan"),
        errors,
        int(rows.shape[0]),
    )
