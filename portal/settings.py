"""ModelPort settings, read from the environment (see README, "Configuration").

Defaults give a working single-machine installation with nothing but Python:
SQLite, an embedded Celery broker on the file system, a local MLflow store and
local serving processes. Real services are configured by environment variables.
"""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from portal.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_optional,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("MODELPORT_DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    configured = env_optional("MODELPORT_SECRET_KEY")
    if configured:
        return configured
    # A fresh installation gets a random key kept in the data directory, so that
    # sessions survive restarts without a secret ever being written in code.
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("MODELPORT_DEBUG", False)
ALLOWED_HOSTS = env_list("MODELPORT_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("MODELPORT_CSRF_TRUSTED_ORIGINS", [])
# The address users reach the portal at; used in links, the CLI snippets and curl examples.
PUBLIC_URL = env_str("MODELPORT_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "portal.core",
    "portal.accounts",
    "portal.registry",
    "portal.deployments",
    "portal.monitoring",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "portal.accounts.middleware.CurrentTeamMiddleware",
    # Last, as django-axes asks: turns a locked-out sign-in into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.core.context_processors.portal",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'modelport.sqlite3'}"),
        conn_max_age=env_int("MODELPORT_DB_CONN_MAX_AGE", 0, minimum=0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web and workers share the file: WAL lets readers run beside one writer, and
    # IMMEDIATE transactions take the write lock up front instead of failing late.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "portal.accounts.backends.SignInLockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "registry:model_list"
LOGOUT_REDIRECT_URL = "accounts:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("MODELPORT_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("MODELPORT_STATIC_ROOT", str(DATA_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Uploads: streamed to disk while hashing (portal.registry.uploads), never held in memory.
FILE_UPLOAD_HANDLERS = ["portal.registry.uploads.HashingUploadHandler"]
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "storage" / "incoming")
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
MODELPORT_MAX_UPLOAD_BYTES = env_int("MODELPORT_MAX_UPLOAD_MB", 2048, minimum=1) * 1024 * 1024
MODELPORT_STORAGE_DIR = DATA_DIR / "storage"

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if env_bool("MODELPORT_HTTPS", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("MODELPORT_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("MODELPORT_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("MODELPORT_HSTS_PRELOAD", True)

# ---------------------------------------------------------------- REST API
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "portal.core.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_str("MODELPORT_API_ANON_RATE", "60/min"),
        "user": env_str("MODELPORT_API_RATE", "1200/min"),
        # Creating API tokens and inference keys (API and pages).
        "credentials": env_str("MODELPORT_CREDENTIALS_RATE", "20/hour"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ModelPort API",
    "DESCRIPTION": (
        "Upload models, track their versions, deploy them as inference endpoints and "
        "roll them back. Authenticate with `Authorization: Token <token>`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI's assets come from the drf-spectacular-sidecar package, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"SourceFormatEnum": "portal.registry.choices.SourceFormat"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "portal.core.schema.add_error_responses",
    ],
}

# ---------------------------------------------------------------- Celery
CELERY_BROKER_URL = env_optional("CELERY_BROKER_URL") or "filesystem://"
CELERY_EMBEDDED_BROKER = CELERY_BROKER_URL == "filesystem://"
if CELERY_EMBEDDED_BROKER:
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        "control_folder": str(_broker_dir / "control"),
    }
else:
    # Longer than the longest task, so Redis does not hand a running task to a second worker.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env_int("MODELPORT_TASK_VISIBILITY_TIMEOUT", 4 * 3600, minimum=60)
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "pipeline"
# No routes by module name: each task declares its queue on its decorator (portal/celery.py
# lists the queues and what runs on each).
CELERY_TASK_ROUTES: dict[str, dict[str, str]] = {}
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "portal.core.tasks.reconcile",
        "schedule": env_float("MODELPORT_RECONCILE_SECONDS", 30.0),
    },
}
CELERY_BEAT_SCHEDULE["metrics"] = {
    "task": "portal.monitoring.tasks.metrics_scrape",
    "schedule": env_float("MODELPORT_METRICS_SECONDS", 10.0),
}
# Storage GC: what deleted versions and models left (files, images, containers).
CELERY_BEAT_SCHEDULE["storage-gc"] = {
    "task": "portal.registry.tasks.storage_collect",
    "schedule": env_float("MODELPORT_GC_SECONDS", 3600.0),
    "options": {"queue": "deploy"},
}
# Batch jobs whose worker died (row untouched, lock free) go back to a batch worker.
CELERY_BEAT_SCHEDULE["batch-resume"] = {
    "task": "portal.deployments.tasks.batch_jobs_resume",
    "schedule": env_float("MODELPORT_BATCH_RESUME_SECONDS", 60.0),
}
# Per deployment, the last N versions that went live stay deletable-proof for rollback.
MODELPORT_RETENTION_VERSIONS = env_int("MODELPORT_RETENTION_VERSIONS", 3, minimum=1)
MODELPORT_IDEMPOTENCY_HOURS = env_int("MODELPORT_IDEMPOTENCY_HOURS", 24, minimum=1)
MODELPORT_METRICS_RETENTION_HOURS = env_int("MODELPORT_METRICS_RETENTION_HOURS", 24, minimum=1)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# ---------------------------------------------------------------- MLflow
MLFLOW_TRACKING_URI = env_optional("MLFLOW_TRACKING_URI") or (
    f"sqlite:///{DATA_DIR / 'mlflow' / 'mlflow.db'}"
)
MLFLOW_ARTIFACT_ROOT = env_str(
    "MODELPORT_MLFLOW_ARTIFACT_ROOT", str(DATA_DIR / "mlflow" / "artifacts")
)
MLFLOW_EXPERIMENT = env_str("MODELPORT_MLFLOW_EXPERIMENT", "modelport")
# Where browsers reach the MLflow UI; links on the pages are built from it.
MLFLOW_UI_URL = (
    env_optional("MODELPORT_MLFLOW_UI_URL")
    or (MLFLOW_TRACKING_URI if MLFLOW_TRACKING_URI.startswith("http") else "")
).rstrip("/")

# ---------------------------------------------------------------- Engine
# Where serving instances run: local processes, Docker containers, or auto (Docker
# when the deploy worker finds an engine that answers, else local processes).
# Docker when the deploy worker finds an engine, local processes when it does not.
# ``kubernetes``: Deployments on a cluster (the ``kubernetes`` extra; README, "Running on
# Kubernetes").
MODELPORT_RUNTIME = env_choice(
    "MODELPORT_RUNTIME", "auto", ("local", "docker", "auto", "kubernetes")
)
MODELPORT_KUBECONFIG = env_str("MODELPORT_KUBECONFIG", "")  # empty: in-cluster credentials
MODELPORT_KUBE_NAMESPACE = env_str("MODELPORT_KUBE_NAMESPACE", "modelport-serving")
MODELPORT_KUBE_REGISTRY = env_str("MODELPORT_KUBE_REGISTRY", "")
MODELPORT_KUBE_IMAGE_PULL_SECRET = env_str("MODELPORT_KUBE_IMAGE_PULL_SECRET", "")
MODELPORT_KUBE_KSERVE = env_bool("MODELPORT_KUBE_KSERVE", False)
MODELPORT_SERVING_HOST = env_str("MODELPORT_SERVING_HOST", "127.0.0.1")


def _installation_id() -> str:
    configured = env_optional("MODELPORT_INSTALLATION_ID")
    if configured:
        return configured
    # Labels this installation's containers, so that installations sharing one Docker
    # engine never touch each other's; kept in the data directory like the secret key.
    id_file = DATA_DIR / "installation_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(5))
    return id_file.read_text().strip()


MODELPORT_INSTALLATION_ID = _installation_id()
if not re.fullmatch(r"[a-z0-9]{4,32}", MODELPORT_INSTALLATION_ID):
    raise ImproperlyConfigured(
        f"MODELPORT_INSTALLATION_ID={MODELPORT_INSTALLATION_ID!r} must be 4-32 lower-case "
        "letters and digits"
    )
# Images (Docker runtime): the base image, where ModelPort's images are named, caches.
MODELPORT_BASE_IMAGE = env_str("MODELPORT_BASE_IMAGE", "python:3.11-slim")
MODELPORT_LOCAL_BASE_IMAGE = env_str(
    "MODELPORT_LOCAL_BASE_IMAGE", "modelport/base:bookworm-python3.11"
)
MODELPORT_BASE_IMAGE_BUILD = env_bool("MODELPORT_BASE_IMAGE_BUILD", True)
MODELPORT_IMAGE_REPOSITORY = env_str("MODELPORT_IMAGE_REPOSITORY", "modelport")
MODELPORT_IMAGE_CACHE_DIR = Path(
    env_str("MODELPORT_IMAGE_CACHE_DIR", str(DATA_DIR / "images"))
).resolve()
MODELPORT_GPU_ONNXRUNTIME = env_str("MODELPORT_GPU_ONNXRUNTIME", "")
# Containers: the network they join (docker-compose) or the host address their ports
# are published on; the size of their /tmp; the default process limit of a deployment.
MODELPORT_DOCKER_NETWORK = env_str("MODELPORT_DOCKER_NETWORK", "")
MODELPORT_DOCKER_PUBLISH_HOST = env_str("MODELPORT_DOCKER_PUBLISH_HOST", "127.0.0.1")
# The Docker host's path of DATA_DIR, when the workers run in containers (docker-compose
# bind-mounts it): folders mounted into serving containers (keys) are named by it.
MODELPORT_DOCKER_HOST_DATA_DIR = env_str("MODELPORT_DOCKER_HOST_DATA_DIR", "")
# A named volume mounted at DATA_DIR/keys in the workers (docker-compose): serving
# containers mount it read-only instead of a host folder.
MODELPORT_DOCKER_KEYS_VOLUME = env_str("MODELPORT_DOCKER_KEYS_VOLUME", "")
# The GPUs serving containers may be given ("0,1,2,3" or GPU UUIDs); empty: what
# nvidia-smi lists on the deploy worker's host.
MODELPORT_GPU_DEVICES = env_str("MODELPORT_GPU_DEVICES", "")
MODELPORT_CONTAINER_TMPFS_MB = env_int("MODELPORT_CONTAINER_TMPFS_MB", 64, minimum=1)
MODELPORT_CONTAINER_PIDS_LIMIT = env_int("MODELPORT_CONTAINER_PIDS_LIMIT", 256, minimum=16)
# How long a replaced instance may finish the requests it holds before it is stopped.
MODELPORT_DRAIN_S = env_int("MODELPORT_DRAIN_S", 10, minimum=1)
# Stable endpoints through nginx: auto (a managed nginx when one is installed), nginx
# (managed, required), external (nginx runs elsewhere and includes the route folder;
# reloaded by a SIGHUP to MODELPORT_PROXY_CONTAINER), or none (direct instance URLs).
MODELPORT_PROXY = env_choice("MODELPORT_PROXY", "auto", ("auto", "nginx", "external", "none"))
# Without a proxy, local instances hand their listening sockets to the next instance so the
# address never changes. That needs every instance of a deployment on one host: a control
# plane whose deploy workers run on several hosts without a proxy turns it off.
MODELPORT_LOCAL_HANDOVER = env_bool("MODELPORT_LOCAL_HANDOVER", True)
MODELPORT_PROXY_LISTEN = env_str("MODELPORT_PROXY_LISTEN", "127.0.0.1:8080")
# A certificate and its key (PEM text; *_FILE for mounted secrets): the managed proxy
# then serves HTTPS, and gRPC over TLS.
MODELPORT_PROXY_TLS_CERT = env_str("MODELPORT_PROXY_TLS_CERT", "")
MODELPORT_PROXY_TLS_KEY = env_str("MODELPORT_PROXY_TLS_KEY", "")
if bool(MODELPORT_PROXY_TLS_CERT) != bool(MODELPORT_PROXY_TLS_KEY):
    raise ImproperlyConfigured(
        "MODELPORT_PROXY_TLS_CERT and MODELPORT_PROXY_TLS_KEY are set together or not at all"
    )
_PROXY_SCHEME = "https" if MODELPORT_PROXY_TLS_CERT else "http"
MODELPORT_PROXY_URL = env_str(
    "MODELPORT_PROXY_URL", f"{_PROXY_SCHEME}://{MODELPORT_PROXY_LISTEN}"
).rstrip("/")
MODELPORT_PROXY_CHECK_URL = env_str("MODELPORT_PROXY_CHECK_URL", MODELPORT_PROXY_URL).rstrip("/")
MODELPORT_PROXY_DIR = Path(env_str("MODELPORT_PROXY_DIR", str(DATA_DIR / "proxy"))).resolve()
MODELPORT_PROXY_CONTAINER = env_str("MODELPORT_PROXY_CONTAINER", "")
MODELPORT_PROXY_WORKERS = env_int("MODELPORT_PROXY_WORKERS", 2, minimum=1)
# gRPC at the stable address: each deployment gets a port of its own on this host (the
# managed nginx's; empty: none), which clients reach at the public host.
MODELPORT_PROXY_GRPC_HOST = env_str(
    "MODELPORT_PROXY_GRPC_HOST", MODELPORT_PROXY_LISTEN.rsplit(":", 1)[0].strip("[]")
)
MODELPORT_PROXY_GRPC_PUBLIC_HOST = env_str(
    "MODELPORT_PROXY_GRPC_PUBLIC_HOST",
    (urlsplit(MODELPORT_PROXY_URL).hostname or "") if MODELPORT_PROXY_GRPC_HOST else "",
)
MODELPORT_VALIDATION_MEMORY_MB = env_int("MODELPORT_VALIDATION_MEMORY_MB", 4096, minimum=64)
MODELPORT_VALIDATION_TIMEOUT_S = env_int("MODELPORT_VALIDATION_TIMEOUT_S", 300, minimum=5)
MODELPORT_READY_TIMEOUT_S = env_int("MODELPORT_READY_TIMEOUT_S", 120, minimum=5)
MODELPORT_TASK_MAX_ATTEMPTS = env_int("MODELPORT_TASK_MAX_ATTEMPTS", 3, minimum=1)
# A row left in a working state this long without progress is handed back to a worker.
MODELPORT_STALE_AFTER_S = env_int("MODELPORT_STALE_AFTER_S", 900, minimum=30)
# Batch jobs (README "Batch jobs"): rows per chunk (and per request to the runtime), rows
# allowed to fail unless a job says otherwise, the serving instance's quota, and how long
# a running job's row may stay untouched before the resume sweep hands it to a worker.
# 0: each job tries a few chunk sizes on its first rows and runs at the fastest.
# How often the watcher reads each ready replica's metrics (rate, p99, requests in
# flight), and so how often autoscaling decides.
MODELPORT_REPLICA_METRICS_S = max(env_float("MODELPORT_REPLICA_METRICS_S", 5.0), 0.5)
MODELPORT_BATCH_CHUNK_ROWS = env_int("MODELPORT_BATCH_CHUNK_ROWS", 0, minimum=0)
MODELPORT_BATCH_MAX_ERRORS = env_int("MODELPORT_BATCH_MAX_ERRORS", 100, minimum=-1)
MODELPORT_BATCH_CPUS = env_int("MODELPORT_BATCH_CPUS", 1, minimum=1)
MODELPORT_BATCH_MEMORY_MB = env_int("MODELPORT_BATCH_MEMORY_MB", 1024, minimum=128)
MODELPORT_BATCH_STALE_S = env_int("MODELPORT_BATCH_STALE_S", 300, minimum=5)
# A log follower (GET .../logs?follow=true) is a connection held open (no thread): cap it.
MODELPORT_LOG_FOLLOW_MAX_S = env_int("MODELPORT_LOG_FOLLOW_MAX_S", 600, minimum=1)

# ---------------------------------------------------------------- Keys and limits (issue 11, 12)
# One keys file per deployment (hashes only), read by its serving instances.
MODELPORT_KEYS_DIR = Path(env_str("MODELPORT_KEYS_DIR", str(DATA_DIR / "keys"))).resolve()

# ---------------------------------------------------------------- Async inference (issue 15)
# One spool folder per deployment (README "Async inference"), written by its instances
# and worked off by the async dispatcher (manage.py async_dispatcher).
MODELPORT_ASYNC_DIR = Path(env_str("MODELPORT_ASYNC_DIR", str(DATA_DIR / "async"))).resolve()
MODELPORT_ASYNC_MAX_QUEUE = env_int("MODELPORT_ASYNC_MAX_QUEUE", 1000, minimum=1)
MODELPORT_ASYNC_RESULT_TTL_S = env_int("MODELPORT_ASYNC_RESULT_TTL_S", 86400, minimum=1)
MODELPORT_ASYNC_MAX_WAIT_S = env_int("MODELPORT_ASYNC_MAX_WAIT_S", 3600, minimum=1)
MODELPORT_ASYNC_CONCURRENCY = env_int("MODELPORT_ASYNC_CONCURRENCY", 4, minimum=1)
MODELPORT_ASYNC_LEASE_S = env_int("MODELPORT_ASYNC_LEASE_S", 30, minimum=1)
MODELPORT_ASYNC_CALLBACK_HOSTS = [
    host.lower() for host in env_list("MODELPORT_ASYNC_CALLBACK_HOSTS", []) if host
]
MODELPORT_ASYNC_CALLBACK_ATTEMPTS = env_int("MODELPORT_ASYNC_CALLBACK_ATTEMPTS", 10, minimum=1)

# Rate limits count in this cache: set MODELPORT_CACHE_URL (redis://...) so that every
# web process shares the counts; the default counts per process.
_cache_url = env_optional("MODELPORT_CACHE_URL")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": _cache_url}
        if _cache_url
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}
# Sign-in lockout (django-axes): this many failures for one user name from one address
# lock that pair out for MODELPORT_SIGNIN_LOCKOUT_MINUTES (429).
AXES_FAILURE_LIMIT = env_int("MODELPORT_SIGNIN_FAILURES", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("MODELPORT_SIGNIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "accounts/locked.html"

# ---------------------------------------------------------------- Conversion (issue 3)
# Where uploads that are not ONNX are loaded and converted: auto (a throwaway container
# when this worker reaches a Docker engine, else a limited child process), docker
# (containers only; fail without an engine) or local (never containers).
MODELPORT_CONVERSION_SANDBOX = env_choice(
    "MODELPORT_CONVERSION_SANDBOX", "auto", ("auto", "docker", "local")
)
# Without a container, pickle/joblib/TorchScript/.pt2 files (which run code when loaded)
# are refused unless the operator trusts every uploader and switches this on.
MODELPORT_CONVERSION_TRUSTED_LOCAL = env_bool("MODELPORT_CONVERSION_TRUSTED_LOCAL", False)
MODELPORT_CONVERSION_MEMORY_MB = env_int("MODELPORT_CONVERSION_MEMORY_MB", 4096, minimum=256)
MODELPORT_CONVERSION_TIMEOUT_S = env_int("MODELPORT_CONVERSION_TIMEOUT_S", 900, minimum=5)
MODELPORT_CONVERSION_CPUS = env_float("MODELPORT_CONVERSION_CPUS", 1.0)
MODELPORT_CONVERSION_PIDS_LIMIT = env_int("MODELPORT_CONVERSION_PIDS_LIMIT", 256, minimum=16)
MODELPORT_CONVERSION_TMPFS_MB = env_int("MODELPORT_CONVERSION_TMPFS_MB", 1024, minimum=16)
# What a conversion or validation container may write (output and scratch) and log.
MODELPORT_CONVERSION_DISK_MB = env_int("MODELPORT_CONVERSION_DISK_MB", 8192, minimum=16)
MODELPORT_CONVERSION_LOG_MB = env_int("MODELPORT_CONVERSION_LOG_MB", 16, minimum=1)
# The check's default tolerance per output datatype, DATATYPE=ATOL/RTOL (uploads may override).
MODELPORT_CONVERSION_TOLERANCES = env_str(
    "MODELPORT_CONVERSION_TOLERANCES", "FP64=1e-7/1e-6,FP32=1e-4/1e-3,FP16=1e-2/1e-2"
)
# Archives (.zip/.tar.gz with an ONNX model and its external data).
MODELPORT_ARCHIVE_MAX_MB = env_int("MODELPORT_ARCHIVE_MAX_MB", 8192, minimum=1)
MODELPORT_ARCHIVE_MAX_ENTRIES = env_int("MODELPORT_ARCHIVE_MAX_ENTRIES", 1000, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("MODELPORT_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "alembic": {"level": "WARNING"},
    },
}
