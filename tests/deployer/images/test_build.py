"""Real image builds on the Docker engine: base, runtime once per version, model by content."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.images import (
    BaseImageSpec,
    InvalidImageName,
    ModelImageRequest,
    base_image_ensure,
    docker_client,
    image_build,
    model_image_ensure,
    runtime_image_ensure,
)
from tests.onnx_models import linear_model

MB = 1024 * 1024


@pytest.fixture
def client(docker_engine: None) -> Iterator[Any]:
    client = docker_client()
    yield client
    client.close()


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "model.onnx"
    linear_model(path, seed=random.randrange(1 << 30))  # new content: a real first build
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_base_image_is_the_setting_or_a_local_build(client: Any) -> None:
    spec = BaseImageSpec()
    ref = base_image_ensure(spec, client=client)
    # No registry here: python:3.11-slim cannot be pulled, the debootstrap build stands in.
    assert ref in (spec.image, spec.local_image)
    image = client.images.get(ref)
    assert image.attrs["Os"] == "linux"
    out = client.containers.run(
        ref, ["python3", "-c", "import sys, venv; print(sys.version_info[:2])"], remove=True
    )
    assert out.decode().strip() == "(3, 11)"


def test_runtime_image_is_built_once_per_runtime_version(runtime_image: Any, client: Any) -> None:
    from portal.core import engine

    again = runtime_image_ensure(engine.image_config(), device="cpu", client=client)
    assert again.image.cached
    assert again.ref == runtime_image.ref
    assert again.image.image_id == runtime_image.image.image_id
    config = client.images.get(again.ref).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/modelport/bin/python", "-m", "deployer.serving"]
    assert config["Labels"]["modelport.kind"] == "runtime"
    assert config["Labels"]["modelport.runtime-version"] == runtime_image.version
    # Offline and pinned: what runs in the image is what validated models here.
    from importlib.metadata import version

    out = client.containers.run(
        again.ref,
        entrypoint=["python", "-c", "import onnxruntime, numpy; print(onnxruntime.__version__)"],
        remove=True,
        network_mode="none",
    )
    assert out.decode().strip() == version("onnxruntime")


def test_model_image_is_the_runtime_plus_one_small_layer_tagged_by_content(
    runtime_image: Any, client: Any, model_file: tuple[Path, str]
) -> None:
    from portal.core import engine

    path, sha = model_file
    config = engine.image_config()
    lines: list[str] = []
    request = ModelImageRequest(path, sha, runtime_image, labels={"modelport.version": "7"})
    built = model_image_ensure(config, request, log=lines.append, client=client)
    try:
        assert not built.cached
        assert any(line.startswith("Step 1/") for line in lines), lines
        assert built.ref.startswith(f"modelport/model:{sha[:16]}-cpu-")
        assert built.own_layer_bytes <= path.stat().st_size + MB
        assert built.size_bytes - runtime_image.image.size_bytes <= path.stat().st_size + MB
        assert built.labels["modelport.model-sha256"] == sha
        assert built.labels["modelport.version"] == "7"

        # Same content again: nothing is built, whatever the labels say.
        again = model_image_ensure(
            config, ModelImageRequest(path, sha, runtime_image, labels={"modelport.version": "8"})
        )
        assert again.cached
        assert again.image_id == built.image_id

        listing = client.containers.run(
            built.ref, entrypoint=["ls", "-ln", "/model"], remove=True, network_mode="none"
        ).decode()
        # Owned by root, readable by the runtime's user, not writable by it.
        assert "-rw-r--r-- 1 0 0" in listing
        assert "model.onnx" in listing
        assert "config.json" in listing
    finally:
        client.images.remove(built.ref, force=True)


def test_user_text_never_becomes_build_input(tmp_path: Path, client: Any) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    for ref, labels in [
        ("modelport/x:$(id)", {}),
        ("modelport/x:ok", {"modelport.note": "a\nRUN id"}),
        ("modelport/x:ok", {"Bad Key": "v"}),
    ]:
        with pytest.raises(InvalidImageName):
            image_build(tmp_path, ref=ref, labels=labels, client=client)
    with pytest.raises(InvalidImageName):
        image_build(tmp_path, ref="modelport/x:ok", build_args={"X": "a b"}, client=client)


@pytest.mark.django_db
def test_build_base_image_command_finds_an_existing_image(client: Any) -> None:
    from io import StringIO

    from django.conf import settings
    from django.core.management import call_command

    base_image_ensure(BaseImageSpec(), client=client)
    tags = {t for i in client.images.list() for t in i.tags}
    tag = settings.MODELPORT_LOCAL_BASE_IMAGE
    if tag not in tags:
        pytest.skip(f"{tag} is not here ({settings.MODELPORT_BASE_IMAGE} is used instead)")
    out = StringIO()
    call_command("build_base_image", stdout=out)
    assert "already exists" in out.getvalue()


def test_model_image_carries_the_models_external_data(
    runtime_image: Any, client: Any, tmp_path: Path
) -> None:
    """A model whose weights live beside it (uploaded as an archive) is served with them."""
    import onnx

    from portal.core import engine

    path = tmp_path / "model.onnx"
    linear_model(path, in_features=64, out_features=64, seed=random.randrange(1 << 30))
    proto = onnx.load(str(path))
    (tmp_path / "weights").mkdir()
    onnx.save_model(
        proto, str(path), save_as_external_data=True, location="weights/w.bin", size_threshold=0
    )
    assert (tmp_path / "weights" / "w.bin").is_file()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    built = model_image_ensure(
        engine.image_config(), ModelImageRequest(path, sha, runtime_image), client=client
    )
    try:
        out = client.containers.run(
            built.ref,
            entrypoint=["python", "-c", "import numpy as n, onnxruntime as o; "
                        "s = o.InferenceSession('/model/model.onnx'); "
                        "x = {'input': n.ones((1, 64), 'float32')}; "
                        "print(float(s.run(None, x)[0].sum()))"],
            remove=True,
            network_mode="none",
        ).decode()  # fmt: skip
        import numpy as np
        import onnxruntime as ort

        here = ort.InferenceSession(str(path)).run(None, {"input": np.ones((1, 64), "float32")})
        assert float(out.strip()) == pytest.approx(float(here[0].sum()), rel=1e-5)
        # Other weights beside the same model file make another image.
        (tmp_path / "weights" / "w.bin").write_bytes(b"\0" * (64 * 64 * 4))
        other = model_image_ensure(
            engine.image_config(), ModelImageRequest(path, sha, runtime_image), client=client
        )
        assert other.ref != built.ref
        client.images.remove(other.ref, force=True)
    finally:
        client.images.remove(built.ref, force=True)
