"""A rebuild after a code change replaces the image it supersedes; bases are never pulled.

Real builds on the Docker engine, in a repository of this test's own (the engine is
shared: nothing outside that repository is touched).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.images import BaseImageSpec, base_image_ensure, docker_client, image_build
from deployer.images.build import image_replace

# The converter and runtime Dockerfiles' shape: a build stage, a final stage copying from it.
DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS build
COPY app/ /app/
RUN python3 -m compileall -q /app
FROM ${BASE_IMAGE}
COPY --from=build /app /app
"""


@pytest.fixture
def client(docker_engine: None) -> Iterator[Any]:
    # Other builds share the engine: a listing can wait behind them.
    client = docker_client(timeout_s=600)
    yield client
    client.close()


@pytest.fixture
def repository(client: Any) -> Iterator[str]:
    name = f"modelport-test-{uuid.uuid4().hex[:10]}/converter"
    yield name
    for image in client.images.list(name=name):
        for tag in image.tags:
            client.images.remove(tag, force=True)


def _build(client: Any, base: str, repository: str, tmp_path: Path, code: str) -> Any:
    context = tmp_path / code
    (context / "app").mkdir(parents=True)
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "app" / "job.py").write_text(f"VERSION = {code!r}\n")
    return image_build(
        context,
        ref=f"{repository}:0.1.0-{code}",
        labels={"modelport.kind": "converter"},
        build_args={"BASE_IMAGE": base},
        client=client,
        parent_ref=base,
    )


def test_a_rebuild_after_a_code_change_leaves_one_image_and_no_build_stage(
    client: Any, repository: str, tmp_path: Path
) -> None:
    """Before: every code change left another tagged image and a dangling build stage."""
    base = base_image_ensure(BaseImageSpec(), client=client)
    first = _build(client, base, repository, tmp_path, "aaa")
    assert len(first.stage_ids) == 1
    image_replace(client, first, same={"modelport.kind": "converter"})
    second = _build(client, base, repository, tmp_path, "bbb")
    lines: list[str] = []
    removed = image_replace(client, second, same={"modelport.kind": "converter"}, log=lines.append)

    tags = [tag for image in client.images.list(name=repository) for tag in image.tags]
    assert tags == [second.ref]
    assert f"{repository}:0.1.0-aaa" in removed
    dangling = {image.id for image in client.images.list(filters={"dangling": True})}
    for stage in first.stage_ids + second.stage_ids:
        assert not any(image_id.startswith(f"sha256:{stage}") for image_id in dangling), stage
    assert any("superseded by" in line for line in lines)
    # The image that replaced it runs.
    out = client.containers.run(second.ref, ["cat", "/app/job.py"], remove=True)
    assert out.decode().strip() == "VERSION = 'bbb'"


def test_a_superseded_image_a_container_uses_is_kept(
    client: Any, repository: str, tmp_path: Path
) -> None:
    base = base_image_ensure(BaseImageSpec(), client=client)
    first = _build(client, base, repository, tmp_path, "ccc")
    container = client.containers.create(first.ref, ["true"])
    try:
        second = _build(client, base, repository, tmp_path, "ddd")
        lines: list[str] = []
        image_replace(client, second, same={"modelport.kind": "converter"}, log=lines.append)
        tags = {tag for image in client.images.list(name=repository) for tag in image.tags}
        assert tags == {first.ref, second.ref}
        assert any(line.startswith(f"Kept {first.ref}") for line in lines), lines
    finally:
        container.remove(force=True)


def test_the_base_image_is_never_pulled(client: Any) -> None:
    """Before: every build asked the engine to pull python:3.11-slim (a 500 with no registry)."""
    local = base_image_ensure(BaseImageSpec(), client=client)
    absent = f"modelport-test-absent-{uuid.uuid4().hex[:8]}/python:3.11-slim"
    lines: list[str] = []
    ref = base_image_ensure(
        BaseImageSpec(image=absent, local_image=local, build_locally=False),
        client=client,
        log=lines.append,
    )
    assert ref == local
    assert not any("Pull" in line or "pulled" in line for line in lines), lines
