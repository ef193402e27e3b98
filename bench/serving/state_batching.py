"""What batching along a state input's axis buys: a GRU whose state is [layers, batch,
hidden], served with batching on (axis 1 for the state) against --max-batch-size 1.

    python -m bench.serving.state_batching [--repeats 3] [--duration 5] [--concurrency 16]

Before this runtime found batch axes from the graph's dimension names, such a model
was always served request by request (its state's first axis is the layer count).
Both servers run side by side, warmed up on the same recorded sample; every run sends
the same one-row request, alternating which server goes first; figures are medians.
The GRU is the test zoo's (tests/zoo_models.py, random weights; needs the torch extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from bench.serving.load import run_wrk
from bench.serving.servers import start_modelport, wait_idle
from deployer.samples import save_known_answer
from tests.zoo_models import gru, reference, v2_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.state_batching")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = gru(work / "gru.onnx")
        sample = work / "known.npz"
        save_known_answer(sample, model.sample, reference(model, model.sample))
        common = ["--no-access-log", "--warmup-sample", str(sample)]
        servers = {
            "batching off": start_modelport(
                model.path, "gru", work, [*common, "--max-batch-size", "1"]
            ),
            "batching on": start_modelport(model.path, "gru", work, common),
        }
        x = model.make_inputs(1, args.seq, 7)
        body = json.dumps(v2_request(x)).encode()
        want = reference(model, x)
        results: dict[str, list[float]] = {name: [] for name in servers}
        try:
            for name, server in servers.items():  # correctness first
                url = f"http://127.0.0.1:{server.http_port}{server.infer_path}"
                request = urllib.request.Request(url, data=body, method="POST")
                with urllib.request.urlopen(request, timeout=30) as response:
                    got = {o["name"]: o for o in json.loads(response.read())["outputs"]}
                for output, expected in want.items():
                    served = np.array(got[output]["data"]).reshape(got[output]["shape"])
                    if not np.allclose(served, expected, rtol=1e-4, atol=1e-4):
                        raise SystemExit(f"{name}: output {output} differs from onnxruntime")
            for repeat in range(args.repeats):
                order = list(servers) if repeat % 2 == 0 else list(reversed(servers))
                for name in order:
                    server = servers[name]
                    wait_idle(list(servers.values()))
                    url = f"http://127.0.0.1:{server.http_port}{server.infer_path}"
                    result = run_wrk(url, body, args.concurrency, args.duration)
                    if result.errors:
                        raise SystemExit(f"{name}: {result.errors} failed requests")
                    results[name].append(result.rps)
                    print(f"  [{repeat + 1}] {name:12} {result.rps:9,.0f} req/s")
        finally:
            for server in servers.values():
                server.stop()
    off = statistics.median(results["batching off"])
    on = statistics.median(results["batching on"])
    print(
        f"GRU (state [2, batch, 16], seq {args.seq}) REST JSON c={args.concurrency}: "
        f"batching off {off:,.0f} req/s, batching on {on:,.0f} req/s "
        f"(median of {args.repeats}); on/off {on / off:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
