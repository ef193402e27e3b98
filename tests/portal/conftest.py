"""Portal tests validate and convert in the limited child process unless they ask for Docker.

With a Docker engine, ONNX validation (like every conversion) runs in a container that
only the deploy worker may start, so a pipeline run without ``engine_access`` hands
the version over. Tests about other things (deployments, the proxy, idempotency) call
the pipeline in-process; those that are about the sandbox set
``settings.MODELPORT_CONVERSION_SANDBOX = "docker"`` themselves.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _child_process_sandbox(settings: Any) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
