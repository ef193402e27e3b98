"""Settings for the test suite: the real settings with a private data directory.

The database comes from ``DATABASE_URL`` like everywhere else; ``make test`` points
it at PostgreSQL. Tests that need a worker start a real Celery worker process.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

os.environ.setdefault(
    "MODELPORT_DATA_DIR", os.path.join(tempfile.gettempdir(), f"modelport-test-{os.getpid()}")
)
# Only set in tests that start their own MLflow server; otherwise a private SQLite store.
os.environ.setdefault("MODELPORT_SECRET_KEY", "test-only-" + "k" * 40)
# Local processes unless a test asks for containers (the docker_mode fixture).
os.environ.setdefault("MODELPORT_RUNTIME", "local")
# Rate limits far above what any test sends; the throttle tests set their own.
for _rate in ("MODELPORT_API_RATE", "MODELPORT_API_ANON_RATE", "MODELPORT_CREDENTIALS_RATE"):
    os.environ.setdefault(_rate, "100000/min")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A private proxy port per test run (set in the environment, so that the workers a test
# starts use the same one), and one image cache shared by all runs on this machine:
# wheels and build locks outlive a run's private data directory.
os.environ.setdefault("MODELPORT_PROXY_LISTEN", f"127.0.0.1:{_free_port()}")
os.environ.setdefault(
    "MODELPORT_IMAGE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "modelport-test-images")
)

from portal.settings import *  # noqa: E402, F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # noqa: F405
