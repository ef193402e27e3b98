"""The stable address against the instance's own port: REST and gRPC, 100 B to 8 MB bodies.

One serving instance started by the local runtime, reached three ways: its own port,
the managed nginx (gateway + router, a path and a gRPC port per deployment) and the
Python-only stable address (the deployment's handed-over sockets, same process). For
each body size the same request goes to every path, side by side, in one run:

    .venv/bin/python -m bench.serving.edge            # ~3 min
    .venv/bin/python -m bench.serving.edge --quick

p50 is from sequential requests on one kept-alive connection; req/s from a closed loop
(wrk for REST, h2load for gRPC) at ``--concurrency`` connections.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import requests
from onnx import TensorProto, helper

from bench.serving.load import (
    H2LOAD,
    grpc_request_bytes,
    run_h2load,
    run_wrk,
    v2_binary_body,
    v2_json_body,
)
from deployer.checks import wait_until_ready
from deployer.proxy import NginxProxy, Route, find_nginx, route_prefix
from deployer.runtimes.base import InstanceState, LaunchSpec
from deployer.runtimes.local import LocalProcessRuntime, free_port

SIZES = (100, 12_000, 63_000, 1_000_000, 8_000_000)
NAME = "sum"


def build_sum(path: Path) -> Path:
    """y = sum(x) over a [1, n] float32 input of any length: the body size is free."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1)],
        "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def rest_body(size: int) -> tuple[bytes, str, dict[str, str]]:
    """A V2 request of about ``size`` bytes: JSON up to 64 KB, binary tensor above."""
    if size <= 64_000:
        n = max(1, (size - 60) // 12)
        body = v2_json_body("x", np.full((1, n), 0.123456789, dtype=np.float32))
        return body, "application/json", {}
    n = max(1, (size - 160) // 4)
    body, header = v2_binary_body("x", np.ones((1, n), dtype=np.float32), "y")
    return body, "application/octet-stream", {"Inference-Header-Content-Length": str(header)}


def grpc_body(size: int) -> bytes:
    from deployer.serving.proto import load

    pb = load()

    n = max(1, (size - 40) // 4)
    return grpc_request_bytes(pb, NAME, "x", np.ones((1, n), dtype=np.float32))


def p50_ms(url: str, body: bytes, ctype: str, headers: dict[str, str], count: int) -> float:
    session = requests.Session()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": ctype, **headers})
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    args = parser.parse_args()
    seconds, count = (2.0, 30) if args.quick else (5.0, 100)
    if not find_nginx():
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    with tempfile.TemporaryDirectory(prefix="edge") as tmp:
        work = Path(tmp)
        runtime = LocalProcessRuntime(work / "rt", stable_address=True)
        launch = runtime.start(
            LaunchSpec(
                deployment_id=1,
                revision_id=1,
                model_name=NAME,
                model_version="1",
                model_path=build_sum(work / "sum.onnx"),
            )
        )
        wait_until_ready(
            launch.url,
            NAME,
            timeout_s=120,
            still_running=lambda: runtime.status(launch.handle).state == InstanceState.RUNNING,
            describe_failure=lambda: runtime.logs(launch.handle, tail=20),
        )
        runtime.take_over(launch.handle)
        listen = f"127.0.0.1:{free_port('127.0.0.1')}"
        proxy = NginxProxy(
            work / "proxy",
            public_url=f"http://{listen}",
            check_url=f"http://{listen}",
            listen=listen,
            grpc_host="127.0.0.1",
        )
        try:
            proxy.ensure_running()
            prefix = route_prefix("bench", NAME, "prod")
            route = Route(
                "d1",
                prefix,
                launch.url.removeprefix("http://"),
                1,
                grpc_upstream=launch.grpc_address,
            )
            proxy.set_route(route)
            paths = {
                "instance": (launch.url, launch.grpc_address),
                "nginx": (proxy.url(prefix).rstrip("/"), proxy.grpc_address(route)),
                "handover": (launch.public_url, launch.public_grpc),
            }
            rows = []
            for size in args.sizes:
                runs = []
                for repeat in range(max(1, args.repeats)):
                    # The path measured first rotates: none always meets a warmer machine.
                    names = list(paths)
                    order = names[repeat % len(names) :] + names[: repeat % len(names)]
                    cell = measure(
                        size, {p: paths[p] for p in order}, args.concurrency, seconds, count
                    )
                    runs.append(cell)
                    print(_human(size), {k: round(v, 2) for k, v in cell.items()}, flush=True)
                rows.append((size, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
        finally:
            proxy.stop()
            runtime.stop(launch.handle, grace_s=5)
    print_table(rows, list(paths))


def measure(
    size: int, paths: dict[str, tuple[str, str]], concurrency: int, seconds: float, count: int
) -> dict[str, float]:
    """p50 and req/s of one body size on every path, REST then gRPC, side by side."""
    body, ctype, headers = rest_body(size)
    cell: dict[str, float] = {}
    for path, (rest, _grpc) in paths.items():
        url = f"{rest}/v2/models/{NAME}/infer"
        cell[f"rest_p50_{path}"] = p50_ms(url, body, ctype, headers, count)
    for path, (rest, _grpc) in paths.items():
        url = f"{rest}/v2/models/{NAME}/infer"
        load = run_wrk(url, body, concurrency, seconds, ctype, headers)
        cell[f"rest_rps_{path}"] = load.rps
        cell[f"rest_err_{path}"] = load.errors
    if H2LOAD:
        payload = grpc_body(size)
        for path, (_rest, grpc) in paths.items():
            one = run_h2load(grpc, payload, 1, seconds / 2)
            cell[f"grpc_p50_{path}"] = one.p50_ms
            cell[f"grpc_err_{path}"] = one.errors
        for path, (_rest, grpc) in paths.items():
            load = run_h2load(grpc, payload, concurrency, seconds)
            cell[f"grpc_rps_{path}"] = load.rps
            cell[f"grpc_err_{path}"] += load.errors
    return cell


def print_table(rows: list[tuple[int, dict[str, float]]], paths: list[str]) -> None:
    """One line per size and protocol: p50 and req/s per path, req/s as a ratio to the
    instance's own port."""
    others = paths[1:]
    print()
    print(
        "| body | protocol | "
        + " | ".join(f"p50 {p}" for p in paths)
        + " | "
        + " | ".join(f"req/s {p}" for p in paths)
        + " | errors |"
    )
    print("|---|---|" + "---|" * (2 * len(paths) + 1))
    for size, cell in rows:
        for proto in ("rest", "grpc"):
            if f"{proto}_p50_instance" not in cell:
                continue
            base = cell[f"{proto}_rps_instance"]
            p50s = " | ".join(f"{cell[f'{proto}_p50_{p}']:.2f} ms" for p in paths)
            rps = [f"{base:.0f}"] + [
                f"{cell[f'{proto}_rps_{p}']:.0f} ({cell[f'{proto}_rps_{p}'] / base:.2f})"
                if base
                else "0"
                for p in others
            ]
            errors = int(sum(cell[f"{proto}_err_{p}"] for p in paths))
            label = "gRPC" if proto == "grpc" else "REST"
            print(f"| {_human(size)} | {label} | {p50s} | {' | '.join(rps)} | {errors} |")


def _human(size: int) -> str:
    if size >= 1_000_000:
        return f"{size // 1_000_000} MB"
    if size >= 1000:
        return f"{size // 1000} KB"
    return f"{size} B"


if __name__ == "__main__":
    main()
