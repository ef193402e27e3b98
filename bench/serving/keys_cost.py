"""What the key check costs: req/s at c=32 on the MLP with --keys-file against without.

    python -m bench.serving.keys_cost [--repeats 3] [--duration 5]

Both servers run side by side and every run sends the same Authorization header (the
server without keys ignores it), alternating which goes first; figures are medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.serving.load import run_wrk, v2_json_body
from bench.serving.models import build_mlp
from bench.serving.servers import start_modelport, wait_idle

KEY = "mp_bench_key_0123456789abcdef"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.keys_cost")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_mlp(work / "mlp.onnx")
        keys = work / "keys.json"
        entry = {"id": "k_bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}
        entry |= {"expires_at": None, "rate_per_s": None, "burst": None}
        # A few other keys, so the constant-time loop compares more than one.
        others = [
            {**entry, "id": f"k_{i}", "sha256": hashlib.sha256(b"%d" % i).hexdigest()}
            for i in range(9)
        ]
        keys.write_text(json.dumps({"version": 1, "public": False, "keys": [entry, *others]}))
        servers = {
            "keys off": start_modelport(model, "mlp", work, ["--no-access-log"]),
            "keys on": start_modelport(
                model, "mlp", work, ["--no-access-log", "--keys-file", str(keys)]
            ),
        }
        body = v2_json_body("input", np.ones((1, 256), np.float32))
        headers = {"Authorization": f"Bearer {KEY}"}
        results: dict[str, list[float]] = {name: [] for name in servers}
        try:
            for repeat in range(args.repeats):
                order = list(servers) if repeat % 2 == 0 else list(reversed(servers))
                for name in order:
                    server = servers[name]
                    wait_idle(list(servers.values()))
                    url = f"http://127.0.0.1:{server.http_port}{server.infer_path}"
                    result = run_wrk(url, body, args.concurrency, args.duration, headers=headers)
                    if result.errors:
                        raise SystemExit(f"{name}: {result.errors} failed requests")
                    results[name].append(result.rps)
                    print(f"  [{repeat + 1}] {name:9} {result.rps:9,.0f} req/s")
        finally:
            for server in servers.values():
                server.stop()
    off = statistics.median(results["keys off"])
    on = statistics.median(results["keys on"])
    print(
        f"MLP REST JSON c={args.concurrency}: keys off {off:,.0f} req/s, keys on {on:,.0f} req/s "
        f"(median of {args.repeats}); cost {100 * (off - on) / off:+.1f}%"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
