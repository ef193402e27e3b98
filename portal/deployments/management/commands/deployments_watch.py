"""``manage.py deployments_watch``: the replica watcher (see portal.deployments.watch)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from portal.deployments.watch import replicas_watch


class Command(BaseCommand):
    help = (
        "Watch serving instances: replace a replica the moment it exits, is OOM-killed or "
        "stops answering its readiness check, and record each replica's traffic. Run one "
        "next to the deploy workers (make run does)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write("Watching serving instances.", ending="\n")
        self.stdout.flush()
        replicas_watch(stop)
