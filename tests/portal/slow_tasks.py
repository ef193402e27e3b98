"""A test-only task a worker loads with ``--include``: it holds a worker slot as a slow
conversion would, and counts in Redis how many slots it holds."""

from __future__ import annotations

import time

import redis
from celery import shared_task
from django.conf import settings

BUSY_KEY = "test:slow-conversions-running"


@shared_task(name="tests.slow_conversion", acks_late=True)
def slow_conversion(seconds: float) -> None:
    """Sleep for ``seconds`` in a worker slot, counting itself in while it runs."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.incr(BUSY_KEY)
    try:
        time.sleep(seconds)
    finally:
        broker.decr(BUSY_KEY)
