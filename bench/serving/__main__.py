"""`python -m bench.serving`: ModelPort's runtime vs the servers a user would pick instead.

Peers: mlflow models serve, MLServer, KServe's model server, BentoML and Triton (as
nvidia-pytriton ships it, where it starts), with in-process onnxruntime as the ceiling.

Closed-loop load at several concurrencies over REST JSON (wrk), REST binary (wrk with a
binary body) and gRPC (a multi-process Python client), servers interleaved within each
repeat, medians over repeats, every figure also given as a ratio to ModelPort's runtime.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.serving.load import (
    grpc_request_bytes,
    mlflow_json_body,
    run_grpc,
    run_h2load,
    run_wrk,
    v2_binary_body,
    v2_json_body,
)
from bench.serving.models import build_mlp, build_resnet50
from bench.serving.servers import (
    REPO,
    Server,
    start_bentoml,
    start_kserve,
    start_mlflow,
    start_mlserver,
    start_modelport,
    start_pytriton,
    wait_idle,
)

MODELS = {
    "mlp": {"build": build_mlp, "input": "input", "output": "output", "shape": (1, 256)},
    "cnn": {
        "build": build_resnet50,
        "input": "input",
        "output": "logits",
        "shape": (1, 3, 224, 224),
    },
}
SERVER_ORDER = ["modelport", "mlflow", "mlserver", "kserve", "bentoml", "triton"]
STARTERS = {
    "mlflow": start_mlflow,
    "mlserver": start_mlserver,
    "kserve": start_kserve,
    "bentoml": start_bentoml,
    "triton": start_pytriton,
}
# The JSON body each style of server takes.
JSON_KEYS = {"mlflow": "inputs", "bentoml": "x"}


def in_process_rows_per_s(path: Path, shape: tuple[int, ...], batch: int, seconds: float) -> float:
    """Rows/s of one onnxruntime session with default options, called in a loop."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    for _ in range(3):
        session.run(None, {name: x})
    runs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: x})
        runs += 1
    return runs * batch / (time.perf_counter() - start)


def measure_ceiling(
    onnx_path: Path,
    shape: tuple[int, ...],
    batches: list[int],
    servers: list[Server],
    seconds: float,
    samples: dict[int, list[float]],
) -> None:
    """In-process rows/s at each batch size, with every server idle; appended to samples.

    Called once per repeat so the ceiling sees the same (shared, noisy) machine as the
    runs around it; the report takes medians.
    """
    wait_idle(servers)
    for batch in batches:
        value = in_process_rows_per_s(onnx_path, shape, batch, seconds)
        samples.setdefault(batch, []).append(value)
        print(f"  in-process batch {batch:>3}: {fmt(value)} rows/s", flush=True)


def reference_output(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})[0]


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return {k.lower(): v for k, v in response.headers.items()}, response.read()


def check_answer(
    server: Server, protocol: str, spec: dict, x: np.ndarray, want: np.ndarray, pb
) -> str:
    """Send one request and compare with in-process onnxruntime; '' when right, else why."""
    try:
        if protocol == "json":
            if server.json_style in JSON_KEYS:
                _, data = _post(
                    server.url,
                    mlflow_json_body(x, JSON_KEYS[server.json_style]),
                    {"Content-Type": "application/json"},
                )
                answer = json.loads(data)
                if server.json_style == "mlflow":
                    answer = answer["predictions"]
                got = np.array(answer, dtype=np.float32)
            else:
                _, data = _post(
                    server.url, v2_json_body(spec["input"], x), {"Content-Type": "application/json"}
                )
                out = json.loads(data)["outputs"][0]
                got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        elif protocol == "binary":
            body, length = v2_binary_body(spec["input"], x, spec["output"])
            headers, data = _post(
                server.url,
                body,
                {
                    "Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(length),
                },
            )
            head_len = int(headers["inference-header-content-length"])
            out = json.loads(data[:head_len])["outputs"][0]
            got = np.frombuffer(data[head_len:], dtype="<f4").reshape(out["shape"])
        else:
            import grpc

            with grpc.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=[("grpc.max_receive_message_length", -1)]
            ) as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                reply = pb.ModelInferResponse.FromString(
                    call(grpc_request_bytes(pb, server.model, spec["input"], x), timeout=120)
                )
            out = reply.outputs[0]
            if reply.raw_output_contents:
                got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
            else:
                got = np.array(out.contents.fp32_contents, dtype=np.float32)
            got = got.reshape(list(out.shape))
    except Exception as exc:  # a peer that does not speak this protocol variant
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3):
        return f"wrong answer (shape {got.shape}, want {want.shape})"
    return ""


def modelport_batches(server: Server) -> tuple[int, int]:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{server.model}/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def run_one(server: Server, protocol: str, bodies: dict, concurrency: int, seconds: float):
    if protocol == "json":
        body = bodies.get(f"{server.json_style}_json", bodies["v2_json"])
        return run_wrk(server.url, body, concurrency, seconds)
    if protocol == "binary":
        body, length = bodies["binary"]
        return run_wrk(
            server.url,
            body,
            concurrency,
            seconds,
            content_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(length)},
        )
    target = f"127.0.0.1:{server.grpc_port}"
    if bodies["grpc_client"] == "h2load":
        return run_h2load(target, bodies["grpc"][server.name], concurrency, seconds)
    return run_grpc(target, bodies["grpc"][server.name], concurrency, seconds)


def start_server(name: str, onnx_path: Path, model_name: str, args) -> Server | None:
    if name == "modelport":
        extra = args.modelport_args.split()
        return start_modelport(onnx_path, model_name, args.workdir, extra)
    return STARTERS[name](onnx_path, model_name, args.workdir)


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 s per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--protocols", default="json,binary,grpc")
    parser.add_argument("--servers", default=",".join(SERVER_ORDER))
    parser.add_argument("--modelport-args", default="", help="extra flags for ModelPort's server")
    parser.add_argument(
        "--grpc-client",
        choices=("h2load", "python"),
        default="h2load" if shutil.which("h2load") else "python",
        help="gRPC load generator: h2load (C, nghttp2-client) or a multi-process grpc.aio client",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.duration = 1, 3.0
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    wanted_servers = args.servers.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    from deployer.serving.proto import load

    pb = load()
    report: dict = {
        "command": " ".join(["python -m bench.serving", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {},
    }
    for model_name in args.models.split(","):
        spec = MODELS[model_name]
        onnx_path = spec["build"](args.workdir / f"{model_name}.onnx")
        x = np.random.default_rng(42).standard_normal(spec["shape"]).astype(np.float32)
        want = reference_output(onnx_path, spec["input"], x)
        print(
            f"\n=== {model_name}: in-process onnxruntime ceiling (default session options)",
            flush=True,
        )
        ceiling_batches = sorted({1, *[c for c in concurrencies if c > 1]})
        if model_name == "cnn":
            ceiling_batches = [b for b in ceiling_batches if b <= 8]
        ceiling_samples: dict[int, list[float]] = {}
        ceiling_s = max(2.0, args.duration / 2)

        servers: list[Server] = []
        try:
            for name in SERVER_ORDER:
                if name in wanted_servers:
                    server = start_server(name, onnx_path, model_name, args)
                    if server is not None:
                        servers.append(server)
            bodies = {
                "v2_json": v2_json_body(spec["input"], x),
                "mlflow_json": mlflow_json_body(x),
                "bentoml_json": mlflow_json_body(x, "x"),
                "binary": v2_binary_body(spec["input"], x, spec["output"]),
                "grpc": {
                    s.name: grpc_request_bytes(pb, model_name, spec["input"], x) for s in servers
                },
                "grpc_client": args.grpc_client,
            }
            # Which server speaks which protocol, checked by a real request and answer.
            supported: dict[tuple[str, str], str] = {}
            for server in servers:
                for protocol in protocols:
                    if protocol == "grpc" and not server.grpc_port:
                        supported[(server.name, protocol)] = "no gRPC endpoint"
                        continue
                    if protocol == "binary" and server.json_style in JSON_KEYS:
                        supported[(server.name, protocol)] = "no V2 binary extension"
                        continue
                    supported[(server.name, protocol)] = check_answer(
                        server, protocol, spec, x, want, pb
                    )
                    if supported[(server.name, protocol)]:
                        print(
                            f"  {server.name} {protocol}: not measured: "
                            + supported[(server.name, protocol)]
                        )

            samples: dict[tuple[str, str, int], list] = {}
            batch_sizes: dict[tuple[str, int], list[float]] = {}
            rss: dict[str, float] = {s.name: s.rss_mb() for s in servers}
            for repeat in range(args.repeats):
                measure_ceiling(
                    onnx_path, spec["shape"], ceiling_batches, servers, ceiling_s, ceiling_samples
                )
                for protocol in protocols:
                    for concurrency in concurrencies:
                        order = servers[repeat % len(servers) :] + servers[: repeat % len(servers)]
                        for server in order:
                            if supported.get((server.name, protocol)):
                                continue
                            wait_idle(servers)
                            before = (
                                modelport_batches(server) if server.name == "modelport" else None
                            )
                            result = run_one(server, protocol, bodies, concurrency, args.duration)
                            samples.setdefault((server.name, protocol, concurrency), []).append(
                                result
                            )
                            rss[server.name] = max(rss[server.name], server.rss_mb())
                            if before is not None:
                                after = modelport_batches(server)
                                executions = after[1] - before[1]
                                if executions:
                                    batch_sizes.setdefault((protocol, concurrency), []).append(
                                        (after[0] - before[0]) / executions
                                    )
                            print(
                                f"  [{repeat + 1}/{args.repeats}] {model_name} {protocol:6} "
                                f"c={concurrency:<3} {server.name:9} {fmt(result.rps):>9} req/s  "
                                f"p50 {result.p50_ms:8.2f} ms  "
                                f"p99 {result.p99_ms:8.2f} ms  errors {result.errors}",
                                flush=True,
                            )
            # In-process ceiling at the batch sizes the batcher actually formed (CNN target),
            # measured next to batch 1 again.
            formed = sorted(
                {max(1, round(statistics.median(sizes))) for sizes in batch_sizes.values()}
            )
            measure_ceiling(
                onnx_path, spec["shape"], sorted({1, *formed}), servers, ceiling_s, ceiling_samples
            )
        finally:
            for server in servers:
                server.stop()
        all_ceiling = {b: statistics.median(v) for b, v in ceiling_samples.items()}
        model_report = print_report(
            model_name,
            samples,
            batch_sizes,
            all_ceiling,
            rss,
            supported,
            protocols,
            concurrencies,
            servers,
        )
        report["models"][model_name] = model_report
    out = args.workdir / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nfull results: {out}")
    return 0


def print_report(
    model_name, samples, batch_sizes, ceiling, rss, supported, protocols, concurrencies, servers
):
    names = [s.name for s in servers]
    print(f"\n=== {model_name}: medians over repeats; ratios are server / ModelPort")
    print(
        "  in-process ceiling: "
        + ", ".join(f"batch {b}: {fmt(v)} rows/s" for b, v in sorted(ceiling.items()))
    )
    print("  peak RSS (MiB, server + children): " + ", ".join(f"{n} {rss[n]:.0f}" for n in names))
    table: dict = {"ceiling_rows_per_s": ceiling, "rss_mb": rss, "runs": []}
    header = (
        f"  {'proto':6} {'conc':>4} {'server':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x req/s':>8} {'x p99':>7} {'errors':>6}"
    )
    for protocol in protocols:
        print()
        print(header)
        for concurrency in concurrencies:
            base = samples.get(("modelport", protocol, concurrency))
            base_rps = statistics.median(r.rps for r in base) if base else float("nan")
            base_p99 = statistics.median(r.p99_ms for r in base) if base else float("nan")
            for name in names:
                runs = samples.get((name, protocol, concurrency))
                if not runs:
                    why = supported.get((name, protocol), "")
                    print(f"  {protocol:6} {concurrency:>4} {name:9} {'n/a':>9}  ({why})")
                    continue
                rps = statistics.median(r.rps for r in runs)
                p50 = statistics.median(r.p50_ms for r in runs)
                p99 = statistics.median(r.p99_ms for r in runs)
                errors = sum(r.errors for r in runs)
                extra = ""
                entry = {
                    "protocol": protocol,
                    "concurrency": concurrency,
                    "server": name,
                    "rps": rps,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "errors": errors,
                    "rps_ratio_to_modelport": rps / base_rps if base else None,
                    "p99_ratio_to_modelport": p99 / base_p99 if base else None,
                    "repeats": [r.__dict__ for r in runs],
                }
                if name == "modelport":
                    entry["efficiency_vs_batch1"] = rps / ceiling[1]
                    extra = f"  {100 * rps / ceiling[1]:.0f}% of in-process batch-1"
                    sizes = batch_sizes.get((protocol, concurrency))
                    if sizes:
                        formed = statistics.median(sizes)
                        size = max(1, round(formed))
                        entry["mean_batch_formed"] = formed
                        if size in ceiling:
                            entry["efficiency_vs_formed_batch"] = rps / ceiling[size]
                            share = 100 * rps / ceiling[size]
                            extra += (
                                f"; batch ~{formed:.1f}: {share:.0f}% of in-process at batch {size}"
                            )
                print(
                    f"  {protocol:6} {concurrency:>4} {name:9} {fmt(rps):>9} {p50:8.2f} {p99:8.2f} "
                    f"{rps / base_rps:8.2f} {p99 / base_p99:7.2f} {errors:>6}{extra}"
                )
                table["runs"].append(entry)
    return table


if __name__ == "__main__":
    sys.exit(main())
