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


def _family_image(client: Any, family: str) -> str:
    from deployer.convert.image import converter_image_ensure
    from deployer.images import ImageConfig

    cache = Path(
        os.environ.get("MODELPORT_TEST_IMAGE_CACHE")
        or Path(tempfile.gettempdir()) / "modelport-test-images"
    )
    lines: list[str] = []
    try:
        image = converter_image_ensure(
            ImageConfig(cache_dir=cache), family=family, log=lines.append, client=client
        )
    except Exception as exc:
        pytest.fail(
            f"the {family} converter image could not be built: {exc}\n" + "\n".join(lines[-30:])
        )
    return image.ref


@pytest.fixture(scope="session")
def converter_image(docker_engine: Any) -> str:
    """The converter image's reference (built from the host-side wheelhouse when missing)."""
    return _family_image(docker_engine, "core")


@pytest.fixture(scope="session")
def trees_image(docker_engine: Any) -> str:
    """The trees converter image (XGBoost, LightGBM, CatBoost, onnxmltools)."""
    return _family_image(docker_engine, "trees")


@pytest.fixture(scope="session")
def tree_models(
    docker_engine: Any, trees_image: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Tiny tree models of every kind, trained once per session in the trees image."""
    from tests.deployer.convert.tree_models import build_in_container

    return build_in_container(docker_engine, trees_image, tmp_path_factory.mktemp("trees"))


@pytest.fixture(scope="session")
def tensorflow_image(docker_engine: Any) -> str:
    """The tensorflow converter image (TensorFlow CPU, Keras 3, tf2onnx)."""
    return _family_image(docker_engine, "tensorflow")


@pytest.fixture(scope="session")
def tf_models(
    docker_engine: Any, tensorflow_image: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A .keras model and a SavedModel archive, built once per session in that image."""
    from tests.deployer.convert import tf_models
    from tests.deployer.convert.tree_models import build_in_container

    folder = tmp_path_factory.mktemp("tf")
    built = build_in_container(docker_engine, tensorflow_image, folder, script=tf_models.__file__)
    tf_models.saved_model_tar_gz(built["saved"], folder / "saved.tar.gz")
    return {**built, "saved.tar.gz": folder / "saved.tar.gz"}


@pytest.fixture(scope="session")
def transformers_image(docker_engine: Any) -> str:
    """The transformers converter image (PyTorch CPU, transformers)."""
    return _family_image(docker_engine, "transformers")


@pytest.fixture(scope="session")
def hf_models(
    docker_engine: Any, transformers_image: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A tiny BERT classifier folder (built from a config, no download) and token ids."""
    from tests.deployer.convert import hf_models
    from tests.deployer.convert.tree_models import build_in_container

    folder = tmp_path_factory.mktemp("hf")
    built = build_in_container(docker_engine, transformers_image, folder, script=hf_models.__file__)
    hf_models.folder_tar_gz(built["bert"], folder / "bert.tar.gz")
    return {**built, "bert.tar.gz": folder / "bert.tar.gz"}
