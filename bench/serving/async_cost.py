"""What async inference costs, side by side in one run, on the MLP:

    python -m bench.serving.async_cost [--requests 400] [--duration 5] [--repeats 3]

1. Accepting: p50 of a 202 (body checked, written durably: fsync and rename) against p50 of
   a synchronous answer, one client, sequential requests.
2. Working off: time for the dispatcher (4 calls at once) to answer N queued requests
   against the same N synchronous calls from 4 client threads; the ratio is what the
   spool, the claim and the stored answer add.
3. The synchronous path with a spool configured (``--async-dir``) against without it:
   req/s at c=32 with wrk, alternating which goes first (the REST parser's extra work).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from bench.serving.load import run_wrk, v2_json_body
from bench.serving.models import build_mlp
from bench.serving.servers import start_modelport, wait_idle
from deployer.async_dispatch import Dispatcher, DispatchSettings, Target
from deployer.serving.async_spool import Spool


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.async_cost")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_mlp(work / "mlp.onnx")
        spool_dir = work / "spool"
        Spool(spool_dir).ensure()
        flags = ["--no-access-log"]
        servers = {
            "no spool": start_modelport(model, "mlp", work, flags),
            "spool": start_modelport(
                model,
                "mlp",
                work,
                [*flags, "--async-dir", str(spool_dir), "--async-max-queue", "100000"],
            ),
        }
        body = v2_json_body("input", np.ones((1, 256), np.float32))
        try:
            server = servers["spool"]
            url = f"http://127.0.0.1:{server.http_port}{server.infer_path}"
            session = requests.Session()
            sync_s, accept_s = [], []
            for _ in range(args.requests):
                started = time.perf_counter()
                assert session.post(url, data=body).status_code == 200
                sync_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                answer = session.post(url, data=body, headers={"Prefer": "respond-async"})
                assert answer.status_code == 202, answer.text
                accept_s.append(time.perf_counter() - started)
            print(
                f"1. one client: sync answer p50 {_p50_ms(sync_s):.2f} ms, async accept p50 "
                f"{_p50_ms(accept_s):.2f} ms ({_p50_ms(accept_s) / _p50_ms(sync_s):.2f}x)"
            )

            # 2. The accepted requests, worked off by the dispatcher, against sync calls.
            queued = Spool(spool_dir).depth()
            target = Target(deployment_id=1, spool_dir=spool_dir, infer_url=url)
            dispatcher = Dispatcher(lambda: [target], DispatchSettings(concurrency=4))
            started = time.perf_counter()
            thread = threading.Thread(target=dispatcher.run, daemon=True)
            thread.start()
            while Spool(spool_dir).depth() > 0:
                time.sleep(0.01)
            drained = time.perf_counter() - started
            dispatcher.stop()
            thread.join()
            local = threading.local()

            def call(_: int) -> None:
                if not hasattr(local, "session"):
                    local.session = requests.Session()
                assert local.session.post(url, data=body).status_code == 200

            started = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(call, range(queued)))
            direct = time.perf_counter() - started
            print(
                f"2. {queued} requests, 4 at once: dispatcher {queued / drained:,.0f} req/s, "
                f"direct sync {queued / direct:,.0f} req/s ({direct / drained:.2f}x)"
            )

            results: dict[str, list[float]] = {name: [] for name in servers}
            for repeat in range(args.repeats):
                order = list(servers) if repeat % 2 == 0 else list(reversed(servers))
                for name in order:
                    wait_idle(list(servers.values()))
                    each = servers[name]
                    address = f"http://127.0.0.1:{each.http_port}{each.infer_path}"
                    result = run_wrk(address, body, 32, args.duration)
                    if result.errors:
                        raise SystemExit(f"{name}: {result.errors} failed requests")
                    results[name].append(result.rps)
            off = statistics.median(results["no spool"])
            on = statistics.median(results["spool"])
            print(
                f"3. sync c=32: without spool {off:,.0f} req/s, with spool {on:,.0f} req/s "
                f"(median of {args.repeats}; {100 * (on - off) / off:+.1f}%)"
            )
        finally:
            for each in servers.values():
                each.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
