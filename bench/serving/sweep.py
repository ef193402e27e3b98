"""`python -m bench.serving.sweep`: how ModelPort's batching and thread settings trade off.

The runtime's defaults (max_batch_size, max_queue_delay_us, max_inflight_batches,
intra_op_threads) were picked from this table: MLP over REST JSON at concurrency 1 and 32
(overhead-bound), MLP over gRPC at 64, and the CNN over binary REST at 8 (compute-bound).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import numpy as np

from bench.serving.load import grpc_request_bytes, run_h2load, run_wrk, v2_binary_body, v2_json_body
from bench.serving.models import build_mlp, build_resnet50
from bench.serving.servers import REPO, start_modelport


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.sweep", description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-batch-size", default="8,32,64")
    parser.add_argument("--max-queue-delay-us", default="0,250,1000")
    parser.add_argument("--max-inflight-batches", default="1,2")
    parser.add_argument("--intra-op-threads", default="1,2")
    args = parser.parse_args(argv)
    workdir = REPO / "bench" / "results"
    workdir.mkdir(parents=True, exist_ok=True)
    from deployer.serving.proto import load

    pb = load()
    mlp = build_mlp(workdir / "mlp.onnx")
    cnn = build_resnet50(workdir / "cnn.onnx")
    x_mlp = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    x_cnn = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    loads = [
        ("mlp", mlp, "json", 1),
        ("mlp", mlp, "json", 32),
        ("mlp", mlp, "grpc", 64),
        ("cnn", cnn, "binary", 8),
    ]
    grid = list(
        itertools.product(
            [int(v) for v in args.max_batch_size.split(",")],
            [int(v) for v in args.max_queue_delay_us.split(",")],
            [int(v) for v in args.max_inflight_batches.split(",")],
            [int(v) for v in args.intra_op_threads.split(",")],
        )
    )
    print(
        "mbs  delay_us  inflight  intra | " + " | ".join(f"{m} {p} c={c}" for m, _, p, c in loads)
    )
    for mbs, delay, inflight, intra in grid:
        flags = [
            "--max-batch-size",
            str(mbs),
            "--max-queue-delay-us",
            str(delay),
            "--max-inflight-batches",
            str(inflight),
            "--intra-op-threads",
            str(intra),
        ]
        cells = []
        for model, path, protocol, concurrency in loads:
            server = start_modelport(path, model, workdir, flags)
            try:
                x = x_mlp if model == "mlp" else x_cnn
                output = "output" if model == "mlp" else "logits"
                results = []
                for _ in range(args.repeats):
                    if protocol == "json":
                        results.append(
                            run_wrk(
                                server.url, v2_json_body("input", x), concurrency, args.duration
                            )
                        )
                    elif protocol == "binary":
                        body, length = v2_binary_body("input", x, output)
                        results.append(
                            run_wrk(
                                server.url,
                                body,
                                concurrency,
                                args.duration,
                                content_type="application/octet-stream",
                                headers={"Inference-Header-Content-Length": str(length)},
                            )
                        )
                    else:
                        payload = grpc_request_bytes(pb, model, "input", x)
                        results.append(
                            run_h2load(
                                f"127.0.0.1:{server.grpc_port}", payload, concurrency, args.duration
                            )
                        )
            finally:
                server.stop()
            rps = statistics.median(r.rps for r in results)
            p99 = statistics.median(r.p99_ms for r in results)
            cells.append(f"{rps:8,.0f}/s p99 {p99:6.2f}ms")
        print(f"{mbs:>3}  {delay:>8}  {inflight:>8}  {intra:>5} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
