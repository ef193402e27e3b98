"""``modelport``: push, deploy, inspect and roll back models, manage inference keys, and
call deployments (``infer``, deployer/async_cli.py).

It talks only to the REST API. Server and token come from ``--url``/``--token`` or
``MODELPORT_URL``/``MODELPORT_TOKEN``. Exit codes are stable, for pipelines:

    0  success
    1  the work failed (a version failed its pipeline, a rollout did not go live)
    2  wrong usage
    3  not signed in or not allowed (401/403)
    4  not found (404)
    5  request refused (400, 409, 413, 422: the message says why)
    6  server error or server unreachable
    7  timed out waiting
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deployer.async_cli import add_infer_parser
from deployer.client import Client, ClientError, WaitTimeout

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4, 5
EXIT_SERVER, EXIT_TIMEOUT = 6, 7


class Output:
    """Human lines on stderr as work proceeds; one result on stdout (JSON with --json)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def progress(self, message: str) -> None:
        if not self.as_json:
            print(message, file=sys.stderr, flush=True)

    def result(self, document: dict[str, Any], summary: str) -> None:
        if self.as_json:
            print(json.dumps(document, indent=2, sort_keys=True))
        else:
            print(summary)


def _exit_code(error: ClientError) -> int:
    if isinstance(error, WaitTimeout):
        return EXIT_TIMEOUT
    if error.status in (401, 403):
        return EXIT_AUTH
    if error.status == 404:
        return EXIT_NOT_FOUND
    if 400 <= error.status < 500:
        return EXIT_REFUSED
    return EXIT_SERVER


def _deploy_and_wait(
    client: Client, out: Output, *, model: str, number: int, deployment: str, device: str,
    wait: bool, timeout: float, min_replicas: int | None = None,
    max_replicas: int | None = None, gpu_count: int | None = None, gpu_ids: str | None = None,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    accepted = client.deploy(
        model, number, deployment=deployment, device=device,
        min_replicas=min_replicas, max_replicas=max_replicas,
        gpu_count=gpu_count, gpu_ids=gpu_ids,
    )  # fmt: skip
    dep, revision = accepted["deployment"], accepted["revision"]
    out.progress(f"Deploying {model} v{number} to {deployment} (revision {revision['id']})…")
    if not wait:
        return EXIT_OK, accepted
    return _finish_rollout(client, out, dep["id"], revision["id"], timeout)


def _finish_rollout(
    client: Client, out: Output, deployment_id: int, revision_id: int, timeout: float
) -> tuple[int, dict[str, Any]]:
    revision = client.wait_revision(deployment_id, revision_id, timeout_s=timeout)
    deployment = client.deployment(deployment_id)
    document = {"deployment": deployment, "revision": revision}
    if revision["status"] != "live":
        out.progress(f"Rollout failed: {revision['error'] or deployment['error']}")
        return EXIT_FAILED, document
    out.progress(f"Live at {deployment['endpoint_url']}")
    return EXIT_OK, document


def cmd_push(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"modelport: {path} is not a file", file=sys.stderr)
        return EXIT_USAGE
    client.model_ensure(args.model, args.description or "")
    out.progress(f"Uploading {path.name} to {args.model}…")
    version = client.upload(
        args.model,
        path,
        source_format=args.format or "",
        sample=Path(args.sample) if args.sample else None,
    )
    number = int(version["number"])
    out.progress(f"Uploaded as {args.model} v{number}; status {version['status']}")
    document: dict[str, Any] = {"version": version}
    if not (args.wait or args.deploy):
        out.result(document, f"{args.model} v{number} {version['status']}")
        return EXIT_OK
    version = client.wait_version(args.model, number, timeout_s=args.timeout)
    document["version"] = version
    if version["status"] != "ready":
        out.progress(f"v{number} failed at {version['step'] or 'its pipeline'}: {version['error']}")
        out.result(document, f"{args.model} v{number} failed: {version['error']}")
        return EXIT_FAILED
    out.progress(f"v{number} is ready")
    if not args.deploy:
        out.result(document, f"{args.model} v{number} ready")
        return EXIT_OK
    code, rollout = _deploy_and_wait(
        client, out, model=args.model, number=number, deployment=args.deploy,
        device=args.device, wait=True, timeout=args.timeout,
    )  # fmt: skip
    document.update(rollout)
    endpoint = rollout["deployment"].get("endpoint_url", "")
    out.result(
        document,
        f"{args.model} v{number} live on {args.deploy}: {endpoint}"
        if code == EXIT_OK
        else f"{args.model} v{number} did not go live on {args.deploy}",
    )
    return code


def cmd_deploy(client: Client, args: argparse.Namespace, out: Output) -> int:
    code, document = _deploy_and_wait(
        client, out, model=args.model, number=args.version, deployment=args.deployment,
        device=args.device, wait=args.wait, timeout=args.timeout,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        gpu_count=args.gpus, gpu_ids=args.gpu_ids,
    )  # fmt: skip
    out.result(document, f"{args.model} v{args.version} → {args.deployment}: "
               f"{document['revision']['status']}")  # fmt: skip
    return code


def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.model and args.version:
        version = client.version(args.model, args.version)
        out.result(
            {"version": version},
            f"{args.model} v{version['number']}: {version['status']}"
            + (f" ({version['error']})" if version["error"] else ""),
        )
        return EXIT_FAILED if version["status"] == "failed" else EXIT_OK
    if args.model:
        model = client.model(args.model)
        versions = client.versions(args.model)
        deployments = client.deployments(args.model)
        lines = [f"{model['name']}: {len(versions)} version(s)"]
        lines += [f"  v{v['number']}: {v['status']}" for v in versions[:10]]
        lines += [
            f"  {d['name']}: {d['status']} v{d['current_version']} {d['endpoint_url']} "
            f"({_replicas_line(d)})"
            for d in deployments
        ]
        out.result(
            {"model": model, "versions": versions, "deployments": deployments}, "\n".join(lines)
        )
        return EXIT_OK
    deployments = client.deployments()
    lines = [
        f"{d['model']}/{d['name']}: {d['status']} v{d['current_version']} {d['endpoint_url']}"
        for d in deployments
    ] or ["No deployments."]
    out.result({"deployments": deployments}, "\n".join(lines))
    return EXIT_OK


def _replicas_line(deployment: dict[str, Any]) -> str:
    ready = sum(1 for r in deployment.get("replicas", []) if r["state"] == "ready")
    wanted = deployment.get("replicas_wanted", deployment.get("min_replicas", 1))
    return f"{ready}/{wanted} replicas ready"


def cmd_scale(client: Client, args: argparse.Namespace, out: Output) -> int:
    deployment = client.deployment_find(args.model, args.deployment)
    fields: dict[str, Any] = {}
    for name, value in (
        ("min_replicas", args.min),
        ("max_replicas", args.max),
        ("autoscale_target_inflight", args.autoscale_target),
        ("autoscale_cooldown_s", args.cooldown),
    ):
        if value is not None:
            fields[name] = value
    if not fields:
        out.result({}, "Give --min, --max, --autoscale-target or --cooldown.")
        return EXIT_REFUSED
    updated = client.deployment_update(deployment["id"], **fields)
    target = updated.get("autoscale_target_inflight")
    autoscale = (
        f", autoscaling at {target:g} in flight per replica"
        if target and updated["max_replicas"] > updated["min_replicas"]
        else ""
    )
    out.progress(
        f"{args.model}/{args.deployment}: {updated['min_replicas']}..{updated['max_replicas']} "
        f"replicas{autoscale}"
    )
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while True:
            updated = client.deployment(deployment["id"])
            ready = sum(1 for r in updated["replicas"] if r["state"] == "ready")
            if ready == updated["replicas_wanted"] and updated["status"] == "running":
                break
            if time.monotonic() > deadline:
                out.result({"deployment": updated}, f"Timed out: {_replicas_line(updated)}")
                return EXIT_TIMEOUT
            time.sleep(1)
    summary = f"{args.model}/{args.deployment}: {_replicas_line(updated)}"
    out.result({"deployment": updated}, summary)
    return EXIT_OK


def cmd_rollback(client: Client, args: argparse.Namespace, out: Output) -> int:
    deployment = client.deployment_find(args.model, args.deployment)
    accepted = client.rollback(deployment["id"], args.to_version)
    revision = accepted["revision"]
    out.progress(f"Rolling {args.model}/{args.deployment} back to v{args.to_version}…")
    if not args.wait:
        out.result(accepted, f"Rollback to v{args.to_version} requested")
        return EXIT_OK
    code, document = _finish_rollout(client, out, deployment["id"], revision["id"], args.timeout)
    out.result(
        document,
        f"{args.model}/{args.deployment} serves v{args.to_version}"
        if code == EXIT_OK
        else f"Rollback to v{args.to_version} failed",
    )
    return code


def cmd_logs(client: Client, args: argparse.Namespace, out: Output) -> int:
    deployment = client.deployment_find(args.model, args.deployment)
    if args.follow:
        for line in client.follow_logs(deployment["id"], tail=args.tail):
            print(line, flush=True)
        return EXIT_OK
    logs = client.logs(deployment["id"], tail=args.tail)
    out.result(logs, logs["lines"].rstrip("\n") or "No log lines yet.")
    return EXIT_OK


def _key_id(text: str) -> int:
    """A key's id as ``list`` shows it: ``12`` or ``k_12``."""
    return int(text.removeprefix("k_"))


def cmd_keys(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "create":
        expires_at = None
        if args.expires_days is not None:
            expires_at = (datetime.now(UTC) + timedelta(days=args.expires_days)).isoformat()
        key = client.key_create(
            args.name,
            deployment=args.deployment,
            expires_at=expires_at,
            rate_per_s=args.rate,
            burst=args.burst,
        )
        out.progress("Copy the key now: it is shown only once.")
        out.result(key, key["key"])
        return EXIT_OK
    if args.action == "revoke":
        key = client.key_revoke(_key_id(args.id))
        out.result(key, f"Revoked {key['name']} ({key['prefix']}…).")
        return EXIT_OK
    keys = client.keys()
    rows = [
        f"{k['key_id']:<8} {k['state']:<8} {k['prefix']}…  {k['name']}"
        + (f"  deployment {k['deployment']}" if k["deployment"] else "")
        + (f"  expires {k['expires_at']}" if k["expires_at"] else "")
        + (f"  last used {k['last_used_at']}" if k["last_used_at"] else "")
        for k in keys
    ]
    out.result({"keys": keys}, "\n".join(rows) or "No inference keys yet.")
    return EXIT_OK


def _batch_line(job: dict[str, Any]) -> str:
    eta = job.get("eta_s")
    left = f", {eta:.0f} s left" if isinstance(eta, int | float) else ""
    return (
        f"batch job {job['id']}: {job['status']}, {job['rows_done']}/{job['total_rows']} rows "
        f"({job['percent']}%), {job['rows_per_s']:.0f} rows/s{left}, {job['errors']} errors"
    )


def cmd_batch(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"modelport: {path} is not a file", file=sys.stderr)
        return EXIT_USAGE
    mapping = None
    if args.mapping:
        try:
            mapping = json.loads(args.mapping)
        except ValueError as exc:
            print(f"modelport: --mapping is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    out.progress(f"Uploading {path.name} to score with {args.model} v{args.version}…")
    job = client.batch_create(
        args.model, args.version, path, mapping=mapping, chunk_rows=args.chunk_rows,
        max_errors=args.max_errors,
    )  # fmt: skip
    out.progress(
        f"Batch job {job['id']} queued: {job['total_rows']} rows, mapping {job['mapping']}"
    )
    if not (args.wait or args.output):
        out.result({"job": job}, f"batch job {job['id']} {job['status']}")
        return EXIT_OK
    seen = [""]

    def show(current: dict[str, Any]) -> None:
        line = _batch_line(current)
        if line != seen[0]:
            seen[0] = line
            out.progress(line)

    job = client.wait_batch(job["id"], timeout_s=args.timeout, on_poll=show)
    document: dict[str, Any] = {"job": job}
    if job["status"] != "succeeded":
        for error in job.get("first_errors") or []:
            out.progress(f"  row {error['row']}: {error['error']}")
        out.result(document, f"batch job {job['id']} {job['status']}: {job['error']}")
        return EXIT_FAILED
    if args.output:
        target = Path(args.output)
        if target.is_dir():
            target = target / job["output_name"]
        size = client.batch_download(job["id"], target)
        document["output"] = str(target)
        out.progress(f"Wrote {target} ({size} bytes, sha256 {job['output_sha256'][:12]}…)")
    out.result(
        document,
        f"batch job {job['id']} succeeded: {job['rows_done']} rows, {job['errors']} errors"
        + (f", output {document['output']}" if "output" in document else ""),
    )
    return EXIT_OK


def _common(*, suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command (``modelport --json push …`` or
    ``modelport push … --json``); after the command they only override when given."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    common.add_argument(
        "--url", default=default(os.environ.get("MODELPORT_URL", "http://127.0.0.1:8000"))
    )
    common.add_argument("--token", default=default(os.environ.get("MODELPORT_TOKEN", "")))
    common.add_argument(
        "--json", action="store_true", default=default(False), help="Print the result as JSON."
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=default(900.0),
        help="Seconds to wait for --wait (default 900).",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelport",
        description="Push, deploy and roll back models on a ModelPort server.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage, 3 auth, 4 not found, 5 refused, "
        "6 server error, 7 timeout.",
        parents=[_common(suppress=False)],
    )
    sub = [_common(suppress=True)]
    commands = parser.add_subparsers(dest="command", required=True)

    push = commands.add_parser("push", parents=sub, help="Upload a model file as a new version.")
    push.add_argument("file")
    push.add_argument("--model", required=True)
    push.add_argument("--description", help="Description if the model is created.")
    push.add_argument("--format", help="The file's format, if not detected.")
    push.add_argument(
        "--sample",
        help="A sample input (.npy, .npz or JSON): the conversion proof, and the warm-up "
        "input and known answer of every deployment of the version.",
    )
    push.add_argument("--wait", action="store_true", help="Wait until the version is ready.")
    push.add_argument("--deploy", metavar="NAME", help="Then deploy it (implies --wait).")
    push.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    push.set_defaults(handler=cmd_push)

    deploy = commands.add_parser("deploy", parents=sub, help="Deploy an existing version.")
    deploy.add_argument("--model", required=True)
    deploy.add_argument("--version", type=int, required=True)
    deploy.add_argument("--deployment", default="production")
    deploy.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    deploy.add_argument("--wait", action="store_true")
    deploy.add_argument("--min-replicas", type=int, help="Instances that serve it (default 1).")
    deploy.add_argument("--max-replicas", type=int, help="Upper bound (default: the minimum).")
    deploy.add_argument("--gpus", type=int, help="With --device gpu: GPUs per replica (default 1).")
    deploy.add_argument(
        "--gpu-ids", help="With --device gpu: exactly these GPUs (device ids, comma-separated)."
    )
    deploy.set_defaults(handler=cmd_deploy)

    status = commands.add_parser(
        "status", parents=sub, help="Show deployments, a model, or a version."
    )
    status.add_argument("--model")
    status.add_argument("--version", type=int)
    status.set_defaults(handler=cmd_status)

    rollback = commands.add_parser(
        "rollback", parents=sub, help="Return a deployment to an earlier version."
    )
    rollback.add_argument("--model", required=True)
    rollback.add_argument("--deployment", default="production")
    rollback.add_argument("--to-version", type=int, required=True)
    rollback.add_argument("--wait", action="store_true")
    rollback.set_defaults(handler=cmd_rollback)

    scale = commands.add_parser("scale", parents=sub, help="Change a deployment's replicas.")
    scale.add_argument("--model", required=True)
    scale.add_argument("--deployment", default="production")
    scale.add_argument("--min", type=int, help="Replicas that serve it at least.")
    scale.add_argument("--max", type=int, help="Upper bound (default: at least --min).")
    scale.add_argument(
        "--autoscale-target", type=float,
        help="Autoscale between --min and --max at about this many requests in flight per "
        "replica (0: off).",
    )  # fmt: skip
    scale.add_argument("--cooldown", type=int, help="Seconds with no scale-down after a change.")
    scale.add_argument("--wait", action="store_true", help="Wait until that many are ready.")
    scale.set_defaults(handler=cmd_scale)

    logs = commands.add_parser("logs", parents=sub, help="Show a deployment's instance log.")
    logs.add_argument("--model", required=True)
    logs.add_argument("--deployment", default="production")
    logs.add_argument("--tail", type=int, default=200, help="Lines to show first (default 200).")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="Keep printing new lines as they come."
    )
    logs.set_defaults(handler=cmd_logs)

    batch = commands.add_parser(
        "batch", parents=sub, help="Score a dataset file with a model version (a batch job)."
    )
    batch.add_argument("file", help="A .csv, .parquet, .jsonl, .npy or .npz file.")
    batch.add_argument("--model", required=True)
    batch.add_argument("--version", type=int, required=True)
    batch.add_argument(
        "--mapping", help='Input -> column(s) as JSON, e.g. \'{"input": ["a", "b", "c", "d"]}\'.'
    )
    batch.add_argument(
        "--chunk-rows", type=int, help="Rows per chunk (default: the fastest the job finds)."
    )
    batch.add_argument("--max-errors", type=int, help="Rows allowed to fail (-1: any number).")
    batch.add_argument("--wait", action="store_true", help="Show progress until it ends.")
    batch.add_argument("--output", help="Download the output here (a file or a folder).")
    batch.set_defaults(handler=cmd_batch)

    keys = commands.add_parser("keys", parents=sub, help="Create, list and revoke inference keys.")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=sub, help="Create a key (printed once).")
    create.add_argument("--name", required=True)
    create.add_argument("--deployment", type=int, help="Only this deployment (its id).")
    create.add_argument("--expires-days", type=int, help="Expire after this many days.")
    create.add_argument("--rate", type=float, help="Requests per second allowed (429 above).")
    create.add_argument("--burst", type=int, help="Requests allowed at once above the rate.")
    actions.add_parser("list", parents=sub, help="List the team's keys.")
    revoke = actions.add_parser("revoke", parents=sub, help="Revoke a key (works in seconds).")
    revoke.add_argument("id", help="The key's id (12 or k_12).")
    keys.set_defaults(handler=cmd_keys)

    add_infer_parser(commands, sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args.json)
    if not args.token:
        print(
            "modelport: no API token: pass --token or set MODELPORT_TOKEN "
            "(create one on the API tokens page).",
            file=sys.stderr,
        )
        return EXIT_AUTH
    client = Client(url=args.url, token=args.token)
    try:
        code: int = args.handler(client, args, out)
    except ClientError as error:
        print(f"modelport: {error.detail}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"code": error.code, "detail": error.detail}}))
        return _exit_code(error)
    return code


if __name__ == "__main__":
    sys.exit(main())
