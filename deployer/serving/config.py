"""Serving settings: defaults < JSON config file < MODELPORT_SERVING_* environment < flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "MODELPORT_SERVING_"

# Picked with `python -m bench.serving.sweep` on a 2-core machine (bench/serving/README.md).
# Any queue delay costs its full length at low concurrency (MLP, concurrency 1: ~4,000 req/s
# with no delay, ~1,700 with 250 us, ~700 with 1 ms) and bought nothing measurable at 32-64,
# because requests that arrive while a batch runs already form the next one. Batches of 8
# were ~10% slower than 32 or 64 at concurrency 32-64; 32 and 64 were within noise.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_US = 0


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


@dataclass(frozen=True)
class ServingConfig:
    """Everything one serving process needs to know."""

    model: Path
    model_name: str
    model_version: str = "1"
    host: str = "0.0.0.0"  # noqa: S104 - a server in a container listens on all interfaces
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: str = "cpu"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    # Batches allowed to run at once. One batch using all the quota's cores beat two at once
    # (CNN at concurrency 8: same 54 img/s, p99 166 ms against 260-300 ms).
    max_inflight_batches: int = 1
    # onnxruntime session options; 0 means "pick from the CPU quota".
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization_level: str = "all"
    execution_mode: str = "sequential"
    # Threads that call session.run; 0 means "pick from the CPU quota".
    workers: int = 0
    gpu_device_id: int = 0
    max_body_bytes: int = 64 * 1024 * 1024
    drain_timeout_s: float = 30.0
    access_log: bool = True
    log_level: str = "info"
    warmup: bool = True
    # A V2 JSON infer request body to warm up with, for models synthetic zeros do not fit.
    warmup_request: str = ""
    # An .npz of the version's recorded sample (a known answer: input:NAME arrays) to warm
    # up with and to check batching on; it wins over synthetic inputs, not over a request.
    warmup_sample: str = ""
    uvloop: bool = True
    # Listener limits, all in one place (README "Limits"); each has a test on a real socket.
    max_connections: int = 1024  # per listener (REST and gRPC each)
    max_url_bytes: int = 8 * 1024  # REST: 414 past this
    max_header_bytes: int = 64 * 1024  # REST: all header lines together; 431 past this
    header_timeout_s: float = 10.0  # REST: a request head must arrive within this
    keepalive_timeout_s: float = 15.0  # REST: idle keep-alive, and silence inside a body
    max_queue_depth: int = 1024  # requests waiting for a batch; 503/RESOURCE_EXHAUSTED past it
    grpc_max_concurrent_streams: int = 128
    grpc_max_metadata_bytes: int = 16 * 1024
    grpc_handshake_timeout_s: float = 10.0
    grpc_idle_timeout_s: float = 300.0
    grpc_max_connection_age_s: float = 0.0  # 0: no limit
    # JSON file of API keys (README "Keys"); empty: no keys needed.
    keys_file: str = ""
    # A stable address handed between instances (deployer/serving/listen_socket.py).
    listen_fds: str = ""
    handover: str = ""
    # Async inference (deployer/serving/async_http.py): the deployment's spool folder
    # (empty: Prefer: respond-async is ignored), its bound, and the callback hosts.
    async_dir: str = ""
    async_max_queue: int = 1000
    async_callback_hosts: str = ""


_CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("cpu", "gpu"),
    "graph_optimization_level": ("disable", "basic", "extended", "all"),
    "execution_mode": ("sequential", "parallel"),
    "log_level": ("debug", "info", "warning", "error"),
}

_HELP: dict[str, str] = {
    "model": "path of the ONNX model file",
    "model_name": "name the model is served under (/v2/models/{name})",
    "model_version": "version string reported and accepted in /versions/{v}",
    "host": "address to bind all listeners to",
    "http_port": "REST port (Open Inference Protocol v2)",
    "grpc_port": "gRPC port; 0 disables gRPC",
    "metrics_port": "Prometheus metrics port; 0 disables metrics",
    "device": "cpu, or gpu (CUDA execution provider; readiness fails without it)",
    "max_batch_size": "largest batch the dynamic batcher forms; 0 or 1 disables batching",
    "max_queue_delay_us": "longest a request waits for a batch to fill, in microseconds",
    "max_inflight_batches": "batches that may run at the same time",
    "intra_op_threads": "onnxruntime intra-op threads (0: from the CPU quota)",
    "inter_op_threads": "onnxruntime inter-op threads",
    "allow_spinning": "let onnxruntime threads spin while idle",
    "graph_optimization_level": "onnxruntime graph optimization level",
    "execution_mode": "onnxruntime execution mode",
    "workers": "threads that run inferences (0: from the CPU quota)",
    "gpu_device_id": "CUDA device id when --device gpu",
    "max_body_bytes": "largest accepted request body, in bytes",
    "drain_timeout_s": "on SIGTERM, how long to wait for in-flight requests",
    "access_log": "write one JSON line per request to stderr",
    "log_level": "log level",
    "warmup": "run a warm-up inference before reporting ready",
    "warmup_request": "JSON file with a V2 infer request to warm up with (default: zeros)",
    "warmup_sample": ".npz of the recorded sample (known answer) to warm up and probe batching",
    "uvloop": "use uvloop when it is installed",
    "max_connections": "open connections allowed per listener",
    "max_url_bytes": "longest accepted REST request target (414 past it)",
    "max_header_bytes": "largest accepted REST header block (431 past it)",
    "header_timeout_s": "seconds a client has to send a whole REST request head",
    "keepalive_timeout_s": "seconds an idle REST connection (or a stalled body) is kept",
    "max_queue_depth": "requests allowed to wait for a batch (503 / RESOURCE_EXHAUSTED past it)",
    "grpc_max_concurrent_streams": "gRPC streams allowed at once on one connection",
    "grpc_max_metadata_bytes": "largest accepted gRPC metadata (header list) size",
    "grpc_handshake_timeout_s": "seconds a gRPC client has to finish the HTTP/2 handshake",
    "grpc_idle_timeout_s": "seconds an idle gRPC connection is kept",
    "grpc_max_connection_age_s": "close gRPC connections after this many seconds (0: never)",
    "keys_file": "JSON file of API keys to require (empty: open)",
    "listen_fds": "inherited public listening sockets HTTP_FD,GRPC_FD (GRPC_FD -1: none)",
    "handover": "Unix control socket that hands the public sockets on and activates them",
    "async_dir": "spool folder for Prefer: respond-async requests (empty: answer them now)",
    "async_max_queue": "async requests allowed to wait (429 with Retry-After past it)",
    "async_callback_hosts": "comma-separated hosts (or host:port) async callbacks may go to",
}

_FIELDS = {f.name: f for f in dataclasses.fields(ServingConfig)}
_FIELD_TYPES: dict[str, type] = {
    "model": Path,
    "model_name": str,
    "model_version": str,
    "host": str,
    "device": str,
    "graph_optimization_level": str,
    "execution_mode": str,
    "log_level": str,
    "warmup_request": str,
    "warmup_sample": str,
    "keys_file": str,
    "listen_fds": str,
    "handover": str,
    "async_dir": str,
    "async_callback_hosts": str,
}


def _field_type(name: str) -> type:
    if name in _FIELD_TYPES:
        return _FIELD_TYPES[name]
    default = _FIELDS[name].default
    return type(default)


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected a boolean, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    kind = _field_type(name)
    if kind is bool:
        return _parse_bool(name, value)
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is Path:
            return Path(str(value))
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def _validate(values: dict[str, Any]) -> None:
    for name, choices in _CHOICES.items():
        if name in values and values[name] not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {values[name]!r}")
    for port in ("http_port", "grpc_port", "metrics_port"):
        if port in values and not 0 <= values[port] <= 65535:
            raise ConfigError(f"{port}: must be between 0 and 65535")
    if values.get("http_port") == 0:
        raise ConfigError("http_port: the REST listener cannot be disabled")
    for name in (
        "max_batch_size",
        "max_queue_delay_us",
        "intra_op_threads",
        "workers",
        "max_body_bytes",
        "grpc_max_connection_age_s",
    ):
        if name in values and values[name] < 0:
            raise ConfigError(f"{name}: must not be negative")
    for name in (
        "max_inflight_batches",
        "inter_op_threads",
        "max_connections",
        "max_url_bytes",
        "max_header_bytes",
        "max_queue_depth",
        "async_max_queue",
        "grpc_max_concurrent_streams",
        "grpc_max_metadata_bytes",
    ):
        if name in values and values[name] < 1:
            raise ConfigError(f"{name}: must be at least 1")
    for name in (
        "header_timeout_s",
        "keepalive_timeout_s",
        "grpc_handshake_timeout_s",
        "grpc_idle_timeout_s",
    ):
        if name in values and not values[name] > 0:
            raise ConfigError(f"{name}: must be more than 0")
    if not values.get("model_name"):
        raise ConfigError("model_name: required (--model-name)")
    if "/" in values["model_name"]:
        raise ConfigError("model_name: must not contain '/'")
    if not values.get("model"):
        raise ConfigError("model: required (--model)")
    if bool(values.get("listen_fds")) != bool(values.get("handover")):
        raise ConfigError("listen_fds and handover: set both or neither")


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of exiting, so every bad setting exits the same way."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m deployer.serving` argument parser; every flag defaults to unset."""
    parser = _Parser(
        prog="python -m deployer.serving",
        description="Serve one ONNX model over the Open Inference Protocol (REST and gRPC).",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}HTTP_PORT) "
        "or as a snake_case key in the --config JSON file; flags win over the environment, "
        "which wins over the file.",
    )
    parser.add_argument("--config", help="JSON file of settings (snake_case keys)")
    for name in _FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = _field_type(name)
        if kind is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_HELP[name],
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=None,
                choices=_CHOICES.get(name),
                help=_HELP[name],
            )
    return parser


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServingConfig:
    """Resolve the settings from flags, environment and an optional JSON file."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}

    config_path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        try:
            loaded = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config: cannot read {config_path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {config_path} must hold a JSON object")
        unknown = sorted(set(loaded) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"config: unknown keys {', '.join(unknown)}")
        for name, value in loaded.items():
            values[name] = _coerce(name, value)

    for name in _FIELDS:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None and env_value != "":
            values[name] = _coerce(name, env_value)

    for name in _FIELDS:
        flag_value = getattr(args, name)
        if flag_value is not None:
            values[name] = _coerce(name, flag_value)

    _validate(values)
    return ServingConfig(**values)


def cpu_quota() -> int:
    """CPUs this process may use: the cgroup quota when set, else the affinity mask."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        available = max(1, min(available, int(quota + 0.5)))
    return max(1, available)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period
