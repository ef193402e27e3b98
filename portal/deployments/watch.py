"""The replica watcher: a long-running loop beside the deploy worker (``manage.py
deployments_watch``; ``make run`` starts it, and so do the tests that need it).

It learns of every instance's end from the runtimes as it happens
(:func:`deployer.runtimes.watch.watch_exits`: pidfds of local processes, the Docker
engine's event stream) and records it through :func:`replica_exited`, which takes the
replica out of the route at once and enqueues its replacement on the deploy queue. It
also asks every READY replica for readiness each second (a replica that stops
answering is treated as dead: a readiness failure can only be found by asking) and
reads each replica's metrics port for its own request rate and p99.
"""

from __future__ import annotations

import logging
import threading
import time

import requests
from django.conf import settings
from django.db import close_old_connections

from deployer.monitoring import scrape_metrics
from deployer.runtimes.base import InstanceExit
from deployer.runtimes.watch import watch_exits
from portal.core import engine
from portal.deployments.choices import ReplicaState
from portal.deployments.models import Replica
from portal.deployments.replicas import (
    deployment_autoscale,
    replica_exited,
    replica_metrics_record,
    replica_unready,
)

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0
# Consecutive failed readiness checks (2 s each at most) before a replica is replaced.
PROBE_FAILURES = 3


def _on_exit(ended: InstanceExit) -> None:
    close_old_connections()
    if replica_exited(handle=ended.handle, cause=ended.cause):
        log.warning("replica %s (%s) %s", ended.replica_id, ended.handle[:12], ended.cause)


def replicas_watch(stop: threading.Event) -> None:
    """Watch until ``stop`` is set."""
    threads = watch_exits(engine.runtimes_in_use(), _on_exit, stop)
    failures: dict[int, int] = {}
    last_metrics = 0.0
    session = requests.Session()
    try:
        while not stop.wait(PROBE_EVERY_S):
            close_old_connections()
            ready = list(Replica.objects.filter(state=ReplicaState.READY).exclude(internal_url=""))
            failures = {r.pk: failures.get(r.pk, 0) for r in ready}
            for replica in ready:
                why = _probe(session, replica)
                if not why:
                    failures[replica.pk] = 0
                    continue
                failures[replica.pk] += 1
                if failures[replica.pk] >= PROBE_FAILURES:
                    replica_unready(
                        replica_id=replica.pk,
                        cause=f"failed its readiness check {PROBE_FAILURES} times in a row ({why})",
                    )
            if time.monotonic() - last_metrics >= settings.MODELPORT_REPLICA_METRICS_S:
                last_metrics = time.monotonic()
                _measure_and_autoscale(ready)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)


def _measure_and_autoscale(ready: list[Replica]) -> None:
    """Each ready replica's traffic, then one autoscaling step per deployment."""
    for replica in ready:
        if replica.metrics_url:
            try:
                snapshot = scrape_metrics(replica.metrics_url, timeout_s=2)
            except (requests.RequestException, ValueError):
                continue
            replica_metrics_record(replica=replica, snapshot=snapshot)
    for deployment_id in sorted({r.deployment_id for r in ready}):
        decision = deployment_autoscale(deployment_id=deployment_id)
        if decision:
            log.info("deployment %s autoscaled: %s", deployment_id, decision)


def _probe(session: requests.Session, replica: Replica) -> str:
    """ "" when the replica answers ready, else what it answered."""
    try:
        answer = session.get(f"{replica.internal_url}/v2/health/ready", timeout=2)
    except requests.RequestException as exc:
        return f"no answer: {type(exc).__name__}"
    return "" if answer.status_code == 200 else f"HTTP {answer.status_code}"
