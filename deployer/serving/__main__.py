"""`python -m deployer.serving --model M.onnx --model-name NAME`: serve one ONNX model."""

from __future__ import annotations

import logging
import sys

from deployer.serving.config import ConfigError, load_config
from deployer.serving.jsonlog import configure_logging
from deployer.serving.server import serve


def main(argv: list[str] | None = None) -> int:
    """Parse the settings and serve; returns the exit code."""
    configure_logging("info")
    try:
        config = load_config(argv)
    except ConfigError as exc:
        logging.getLogger("deployer.serving").error(
            "bad configuration: %s", exc, extra={"event": "bad_config"}
        )
        return 64
    configure_logging(config.log_level)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
