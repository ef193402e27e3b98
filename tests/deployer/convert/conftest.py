"""The converter image, built once per test session where a Docker engine answers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require


@pytest.fixture(scope="session")
def docker_engine() -> Any:
    from deployer.images import docker_client, engine_available

    require("Docker engine", engine_available(), "start dockerd (make test does)")
    return docker_client(timeout_s=600)


@pytest.fixture(scope="session")
def converter_image(docker_engine: Any) -> str:
    """The converter image's reference (built from the host-side wheelhouse when missing)."""
    from deployer.convert.image import converter_image_ensure
    from deployer.images import ImageConfig

    cache = Path(
        os.environ.get("MODELPORT_TEST_IMAGE_CACHE")
        or Path(tempfile.gettempdir()) / "modelport-test-images"
    )
    lines: list[str] = []
    try:
        image = converter_image_ensure(
            ImageConfig(cache_dir=cache), log=lines.append, client=docker_engine
        )
    except Exception as exc:
        pytest.fail(f"the converter image could not be built: {exc}\n" + "\n".join(lines[-30:]))
    return image.ref
