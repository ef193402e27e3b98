"""The Celery application; its settings are the ``CELERY_*`` names in portal.settings.

Every task names its queue on its decorator (``@shared_task(queue=QUEUE_CONVERT)``); the
queues are what the work is, and each has its own workers (``make run`` and
docker-compose start one worker per queue):

- ``pipeline``: validation, local conversions, MLflow registration (minutes; no Docker).
- ``convert``: sandboxed conversions and image builds (up to the conversion and build
  limits; talks to Docker).
- ``batch``: batch jobs (a dataset scored chunk by chunk; minutes to hours; talks to
  Docker to start the job's serving instance).
- ``deploy``: rollouts, rollbacks, teardowns, reconcile, metrics (seconds; talks to
  Docker). Nothing long runs here, so a rollback never waits behind a conversion.
"""

from __future__ import annotations

import os
import warnings

from celery import Celery
from celery.exceptions import CDeprecationWarning

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

QUEUE_PIPELINE = "pipeline"
QUEUE_CONVERT = "convert"
QUEUE_DEPLOY = "deploy"
QUEUE_BATCH = "batch"
QUEUES = (QUEUE_PIPELINE, QUEUE_CONVERT, QUEUE_DEPLOY, QUEUE_BATCH)
# Work that may run for many minutes, and work somebody is waiting on right now: no
# worker consumes from both sets.
LONG_QUEUES = frozenset({QUEUE_PIPELINE, QUEUE_CONVERT, QUEUE_BATCH})
URGENT_QUEUES = frozenset({QUEUE_DEPLOY})

# Celery 5 (pinned below 6) routes by the queue a task declares; it announces that 6.0
# will ignore it. tests/portal/test_queues.py routes as ``.delay()`` does, so an upgrade
# that stops honouring it fails there instead of silently sending everything to one queue.
warnings.filterwarnings("ignore", "The 'queue' task attribute", CDeprecationWarning)

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
