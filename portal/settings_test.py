"""Settings for the test suite: the real settings with a private data directory.

The database comes from ``DATABASE_URL`` like everywhere else; ``make test`` points
it at PostgreSQL. Tests that need a worker start a real Celery worker process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault(
    "MODELPORT_DATA_DIR", os.path.join(tempfile.gettempdir(), f"modelport-test-{os.getpid()}")
)
# Only set in tests that start their own MLflow server; otherwise a private SQLite store.
os.environ.setdefault("MODELPORT_SECRET_KEY", "test-only-" + "k" * 40)

from portal.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # noqa: F405
