"""``manage.py async_dispatcher``: run spooled async requests and deliver their answers."""

from __future__ import annotations

import logging
import signal
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from deployer.async_dispatch import Dispatcher, Target
from portal.deployments.async_inference import dispatch_settings, dispatch_targets

log = logging.getLogger(__name__)


def _targets() -> list[Target]:
    close_old_connections()  # a long-lived loop: never keep a connection the server dropped
    try:
        return dispatch_targets()
    finally:
        close_old_connections()


class Command(BaseCommand):
    help = (
        "Work off every deployment's async spool: call the deployment for each accepted "
        "Prefer: respond-async request (retrying while its instance is down), store the "
        "answer for polling and POST it, signed, to the request's callback URL. Run one or "
        "more next to the deploy worker (make run and docker-compose start one); a killed "
        "dispatcher's requests go back to the queue after MODELPORT_ASYNC_LEASE_S."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        dispatcher = Dispatcher(_targets, dispatch_settings())

        def stop(signum: int, _frame: object) -> None:
            dispatcher.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write("async dispatcher ready", ending="\n")
        self.stdout.flush()
        dispatcher.run()
        self.stdout.write(
            f"async dispatcher stopped ({dispatcher.completed} answered, "
            f"{dispatcher.delivered} callbacks delivered)"
        )
