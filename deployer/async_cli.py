"""``modelport infer``: call a deployment, synchronously or with ``Prefer: respond-async``.

    modelport infer --model M [--deployment D] --data request.json [--async [--wait]]
                    [--callback URL] [--key KEY]
    modelport infer --model M --result ID [--wait]

The deployment's address comes from the API (the token); the call itself carries an
inference key (``--key`` or ``MODELPORT_KEY``). With ``--async`` it prints the request's
id and Location at once, or with ``--wait`` polls the Location (honouring ``Retry-After``)
and prints the V2 answer. Exit codes as for every command (deployer/cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from deployer.client import Client, ClientError, WaitTimeout


def add_infer_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``infer`` on the ``modelport`` command line."""
    infer = commands.add_parser(
        "infer", parents=parents, help="Call a deployment (optionally async, RFC 7240)."
    )
    infer.add_argument("--model", required=True)
    infer.add_argument("--deployment", default="production")
    infer.add_argument("--key", default=os.environ.get("MODELPORT_KEY", ""), help="Inference key.")
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="A V2 JSON infer request; - reads standard input.")
    source.add_argument("--result", metavar="ID", help="Fetch an async request's answer.")
    infer.add_argument("--async", dest="async_", action="store_true", help="Queue it; 202.")
    infer.add_argument("--wait", action="store_true", help="With --async/--result: poll.")
    infer.add_argument("--callback", help="With --async: POST the answer here too.")
    infer.set_defaults(handler=cmd_infer)


def _failure(response: requests.Response) -> ClientError:
    try:
        detail = str(response.json().get("error") or response.text)
    except ValueError:
        detail = response.text.strip() or response.reason
    return ClientError(f"{response.status_code}: {detail}", status=response.status_code)


def cmd_infer(client: Client, args: argparse.Namespace, out: Any) -> int:
    deployment = client.deployment_find(args.model, args.deployment)
    base = str(deployment["endpoint_url"]).rstrip("/")
    if not base:
        raise ClientError(f"Deployment {args.deployment} has no endpoint yet.", status=409)
    if args.callback and not args.async_:
        raise ClientError("--callback needs --async.", status=400)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    session = requests.Session()
    if args.result:
        location = f"{base}/async/{args.result}"
        return _poll(session, location, headers, args, out, wait=args.wait)
    body = sys.stdin.buffer.read() if args.data == "-" else Path(args.data).read_bytes()
    headers["Content-Type"] = "application/json"
    if args.async_:
        headers["Prefer"] = "respond-async"
        if args.callback:
            headers["ModelPort-Callback-URL"] = args.callback
    try:
        response = session.post(f"{base}/infer", data=body, headers=headers, timeout=args.timeout)
    except requests.RequestException as exc:
        raise ClientError(f"cannot reach {base}: {exc}") from None
    if response.status_code == 202 and args.async_:
        accepted = response.json()
        location = urljoin(f"{base}/infer", response.headers.get("Location", ""))
        out.progress(f"Accepted as {accepted['id']}; poll {location}")
        if not args.wait:
            out.result({"id": accepted["id"], "location": location}, location)
            return 0
        return _poll(session, location, headers, args, out, wait=True)
    if response.status_code != 200:
        raise _failure(response)
    out.result(response.json(), json.dumps(response.json()))
    return 0


def _poll(
    session: requests.Session,
    location: str,
    headers: dict[str, str],
    args: argparse.Namespace,
    out: Any,
    *,
    wait: bool,
) -> int:
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            response = session.get(location, headers=headers, timeout=60)
        except requests.RequestException as exc:
            raise ClientError(f"cannot reach {location}: {exc}") from None
        if response.status_code != 202:
            break
        if not wait:
            state = response.json()
            out.result(state, f"{state['id']}: {state['status']}")
            return 0
        if time.monotonic() > deadline:
            raise WaitTimeout(f"no answer at {location} within {args.timeout:g} s")
        try:
            pause = float(response.headers.get("Retry-After", "1"))
        except ValueError:
            pause = 1.0
        time.sleep(min(max(pause, 0.2), 10.0))
    if response.status_code != 200:
        raise _failure(response)
    out.result(response.json(), json.dumps(response.json()))
    return 0
