"""The listener limits are ServingConfig fields and flags, and bad values are named."""

from __future__ import annotations

import pytest

from deployer.serving.config import ConfigError, load_config

BASE = ["--model", "m.onnx", "--model-name", "m"]


def test_limits_have_defaults_flags_and_environment() -> None:
    config = load_config(BASE, environ={})
    assert config.max_url_bytes == 8 * 1024
    assert config.max_queue_depth == 1024
    assert config.keys_file == ""
    config = load_config(
        [*BASE, "--max-connections", "7", "--header-timeout-s", "0.5"],
        environ={"MODELPORT_SERVING_GRPC_MAX_CONCURRENT_STREAMS": "9"},
    )
    assert (config.max_connections, config.header_timeout_s) == (7, 0.5)
    assert config.grpc_max_concurrent_streams == 9


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-connections", "0", "max_connections: must be at least 1"),
        ("--max-queue-depth", "0", "max_queue_depth: must be at least 1"),
        ("--header-timeout-s", "0", "header_timeout_s: must be more than 0"),
        ("--keepalive-timeout-s", "-1", "keepalive_timeout_s: must be more than 0"),
        ("--grpc-max-connection-age-s", "-1", "grpc_max_connection_age_s: must not be negative"),
        ("--max-url-bytes", "x", "max_url_bytes: expected int"),
    ],
)
def test_bad_limit_is_named(flag: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config([*BASE, flag, value], environ={})


def test_the_removed_native_transport_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="grpc-impl"):
        load_config([*BASE, "--grpc-impl", "native"], environ={})
