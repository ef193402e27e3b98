"""Autoscaling benchmark: step the load up and back down, watch replicas follow it.

    .venv/bin/python -m bench.autoscale [--runtime local|docker] [--low 10] [--high 300]
        [--low-s 20] [--high-s 60] [--after-s 45] [--target 0.05] [--max-replicas 4]

Starts the whole portal as ``make run`` does (``python -m portal.stack``: web, workers,
the replica watcher, MLflow, the managed nginx) in a private data directory, uploads a
256-1024-1024-10 MLP through the REST API, deploys it with 1..max replicas and an
in-flight target, and sends an open-loop load to its stable address with an inference
key: ``--low`` req/s, then ``--high`` req/s, then ``--low`` again. Requests are sent on
a fixed schedule whatever the answers do, and each latency is counted from the moment
the request was due, so a stall shows up in the figures instead of slowing the load.

Prints per phase: requests, failures, p50/p99; the time from the step up to each added
replica being ready; the time from the step down to the replicas going away; the
replicas over time; the autoscaler's decisions as the timeline records them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from bench.serving.models import build_mlp
from bench.serving.servers import stop_group
from deployer.client import Client, ClientError
from deployer.runtimes.local import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "bench-autoscale-password"


@dataclass
class Phase:
    name: str
    rate: float
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.latencies_ms) + len(self.failures)


class SteppedLoad:
    """An open-loop load: request k of a phase is due at ``start + k / rate``; a pool of
    threads with keep-alive sessions takes the due requests in order."""

    def __init__(
        self, url: str, headers: dict[str, str], body: dict[str, Any], phases: list[Phase],
        threads: int = 48,
    ) -> None:  # fmt: skip
        self.url, self.headers, self.body, self.phases = url, headers, body, phases
        self.lock = threading.Lock()
        self.schedule = self._schedule()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.started = 0.0

    def _schedule(self) -> Any:
        at = 0.0
        for phase in self.phases:
            phase.started = at
            count = int(phase.rate * phase.seconds)
            for k in range(count):
                yield phase, at + k / phase.rate
            at += phase.seconds

    def run(self) -> None:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        for thread in self.threads:
            thread.join()

    def _run(self) -> None:
        session = requests.Session()
        while True:
            with self.lock:
                item = next(self.schedule, None)
            if item is None:
                return
            phase, due = item
            due_at = self.started + due
            delay = due_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            failure = ""
            try:
                answer = session.post(self.url, json=self.body, headers=self.headers, timeout=30)
                if answer.status_code != 200 or not answer.json().get("outputs"):
                    failure = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except (requests.RequestException, ValueError) as exc:
                failure = f"{type(exc).__name__}: {exc}"[:300]
            took_ms = (time.monotonic() - due_at) * 1000
            with self.lock:
                if failure:
                    phase.failures.append(f"at {due:.1f} s: {failure}")
                else:
                    phase.latencies_ms.append(took_ms)


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout


def _wait(what: str, check: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, ClientError):
            value = check()
            if value:
                return value
        time.sleep(interval_s)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale")
    parser.add_argument("--runtime", choices=["local", "docker"], default="local")
    parser.add_argument("--low", type=float, default=10.0, help="req/s before and after")
    parser.add_argument("--high", type=float, default=300.0, help="req/s during the step")
    parser.add_argument("--low-s", type=float, default=20.0)
    parser.add_argument("--high-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, default=45.0)
    parser.add_argument("--target", type=float, default=0.05, help="requests in flight")
    parser.add_argument("--cooldown-s", type=float, default=15.0)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)

    data_dir = Path(tempfile.mkdtemp(prefix="modelport-bench-autoscale-"))
    bind = f"127.0.0.1:{free_port('127.0.0.1')}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "MLFLOW_TRACKING_URI")
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "MODELPORT_DATA_DIR": str(data_dir),
            "MODELPORT_BIND": bind,
            "MODELPORT_MLFLOW_PORT": str(free_port("127.0.0.1")),
            "MODELPORT_PROXY_LISTEN": f"127.0.0.1:{free_port('127.0.0.1')}",
            "MODELPORT_RUNTIME": args.runtime,
            "MODELPORT_PROXY": "nginx",
            "MODELPORT_REPLICA_METRICS_S": "1",
            "MODELPORT_SECRET_KEY": "bench-only-" + "k" * 40,
            "MODELPORT_API_RATE": "100000/min",
        }
    )
    _manage(env, "migrate", "--no-input", "-v", "0")
    _manage(env, "bootstrap", "--password", PASSWORD)
    token = _manage(env, "token_create", "--name", "bench").strip().split()[-1]
    log = (data_dir / "stack.log").open("wb")
    stack = subprocess.Popen(
        [sys.executable, "-m", "portal.stack"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    portal_url = f"http://{bind}"
    try:
        return _run(args, Client(url=portal_url, token=token, poll_s=0.5), data_dir)
    finally:
        stop_group(stack, timeout_s=90)  # the stack stops its instances and nginx
        log.close()
        if args.keep:
            print(f"data directory kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def _ready_count(deployment: dict[str, Any]) -> int:
    return sum(1 for r in deployment["replicas"] if r["state"] == "ready")


def _run(args: argparse.Namespace, client: Client, data_dir: Path) -> int:
    _wait("the portal", lambda: client.deployments() is not None, timeout_s=180)
    model_path = build_mlp(data_dir / "mlp.onnx", seed=7)
    client.model_ensure("autoscale-mlp")
    version = client.upload("autoscale-mlp", model_path)
    number = int(version["number"])
    ready = client.wait_version("autoscale-mlp", number, timeout_s=900)
    if ready["status"] != "ready":
        raise SystemExit(f"the version did not become ready: {ready.get('error')}")
    started = client.deploy(
        "autoscale-mlp", number, deployment="production", device="cpu",
        min_replicas=1, max_replicas=args.max_replicas,
    )  # fmt: skip
    deployment_id = int(started["deployment"]["id"])
    running = _wait(
        "the rollout",
        lambda: (d := client.deployment(deployment_id))["status"] in ("running", "failed") and d,
        timeout_s=600,
    )
    if running["status"] != "running":
        raise SystemExit(f"the deployment failed: {running.get('error')}")
    client.deployment_update(
        deployment_id,
        autoscale_target_inflight=args.target,
        autoscale_cooldown_s=args.cooldown_s,
    )
    key = client.key_create("bench-autoscale", deployment=deployment_id)["key"]
    url = f"{running['endpoint_url']}/infer"
    rng = np.random.default_rng(0)
    row = rng.standard_normal(256).astype(np.float32).round(4).tolist()
    body = {"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": row}]}

    phases = [
        Phase("low", args.low, args.low_s),
        Phase("step up", args.high, args.high_s),
        Phase("step down", args.low, args.after_s),
    ]
    load = SteppedLoad(url, {"Authorization": f"Bearer {key}"}, body, phases)
    samples: list[tuple[float, int, int]] = []  # (s since start, ready, wanted)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                d = client.deployment(deployment_id)
                at = time.monotonic() - load.started if load.started else 0.0
                samples.append((round(at, 1), _ready_count(d), int(d["replicas_wanted"])))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(
        f"runtime {args.runtime}; load {args.low:g} req/s for {args.low_s:g} s, "
        f"{args.high:g} req/s for {args.high_s:g} s, {args.low:g} req/s for {args.after_s:g} s; "
        f"target {args.target:g} in flight per replica, cooldown {args.cooldown_s:g} s, "
        f"1..{args.max_replicas} replicas",
        flush=True,
    )
    load.run()
    stop.set()
    sampler.join(timeout=10)
    _report(phases, samples, data_dir, deployment_id)
    failed = sum(len(p.failures) for p in phases)
    return 0 if failed == 0 else 1


def _report(
    phases: list[Phase], samples: list[tuple[float, int, int]], data_dir: Path, deployment_id: int
) -> None:
    print(f"\n{'phase':<10} {'req/s':>6} {'sent':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for phase in phases:
        print(
            f"{phase.name:<10} {phase.rate:>6g} {phase.sent:>6} {len(phase.failures):>6} "
            f"{_pct(phase.latencies_ms, 50):>8.1f} {_pct(phase.latencies_ms, 99):>8.1f}"
        )
    up, down = phases[1].started, phases[2].started
    changes: list[tuple[float, int, int]] = []
    for at, ready, wanted in samples:
        if not changes or changes[-1][1:] != (ready, wanted):
            changes.append((at, ready, wanted))
    print("\nreplicas over time (s since the load started: ready / wanted)")
    print("  " + ", ".join(f"{at:g}: {ready}/{wanted}" for at, ready, wanted in changes))
    base = next((ready for at, ready, _ in samples if at <= up), 1)
    added = [(at - up, ready) for at, ready, _ in changes if at >= up and at < down]
    peak = max((ready for _, ready in added), default=base)
    for count in range(base + 1, peak + 1):
        first = next((at for at, ready in added if ready >= count), None)
        if first is not None:
            print(f"time to {count} ready replicas after the step up: {first:.1f} s")
    back = next((at - down for at, ready, _ in changes if at >= down and ready <= base), None)
    print(
        "back to the minimum after the step down: "
        + (f"{back:.1f} s" if back is not None else "not within the run")
    )
    failed = [f for p in phases for f in p.failures]
    print(f"failed requests: {len(failed)}")
    for failure in failed[:5]:
        print(f"  {failure.strip()}")
    with sqlite3.connect(data_dir / "modelport.sqlite3") as db:
        decisions = [
            message
            for (message,) in db.execute(
                "SELECT message FROM core_event WHERE deployment_id = ? AND step = 'autoscale' "
                "ORDER BY id",
                (deployment_id,),
            )
        ]
    print("decisions (from the deployment's timeline):")
    for decision in decisions:
        print(f"  {decision}")


if __name__ == "__main__":
    raise SystemExit(main())
