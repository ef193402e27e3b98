"""The docker-compose layout on the real engine: nginx in its own container, model
containers on a shared network, routes through a shared folder, reloads by SIGHUP.

Also: docker-compose.yml passes ``docker-compose config``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile

from deployer.images import BaseImageSpec, base_image_ensure, docker_client, image_build
from deployer.proxy.config import GATEWAY_COMMON, HTTP_COMMON, SERVER_COMMON
from deployer.runtimes.docker import MANAGED
from portal.core import engine
from portal.deployments import services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry import services as registry_services
from portal.registry.models import Model
from tests.conftest import REPO, Personas, require, wait_for
from tests.onnx_models import linear_model
from tests.portal.factories import inference_headers

X = [1.0, 2.0, 3.0, 4.0]


def test_compose_file_is_valid() -> None:
    compose = shutil.which("docker-compose")
    require(
        "docker-compose", compose is not None, "apt-get install docker-compose (make test does)"
    )
    assert compose is not None
    env = {**os.environ, "MODELPORT_SECRET_KEY": "x" * 50, "DOCKER_GID": "999"}
    result = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    import yaml

    services = yaml.safe_load(result.stdout)["services"]
    assert {"web", "pipeline-worker", "convert-worker", "deploy-worker", "beat", "postgres",
            "redis", "mlflow", "proxy"} <= set(services)  # fmt: skip
    # Only the convert, deploy and batch workers get the Docker socket (a batch job starts a
    # container of its version's image).
    with_socket = [
        name
        for name, service in services.items()
        if "docker.sock" in str(service.get("volumes", []))
    ]
    assert sorted(with_socket) == ["batch-worker", "convert-worker", "deploy-worker"]
    assert services["deploy-worker"]["environment"]["MODELPORT_RUNTIME"] == "docker"
    assert services["web"]["environment"]["MODELPORT_PROXY"] == "external"
    assert "8080" in str(services["proxy"]["ports"])


@pytest.mark.parametrize(
    ("name", "common"),
    [
        ("nginx-compose.conf", (HTTP_COMMON, SERVER_COMMON)),
        ("gateway-compose.conf", (GATEWAY_COMMON,)),
    ],
)
def test_compose_nginx_configs_match_the_managed_ones(
    tmp_path: Path, name: str, common: tuple[str, ...]
) -> None:
    text = (REPO / "deployer" / "proxy" / name).read_text()
    for part in common:
        assert part in text
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    require("nginx", os.access(nginx, os.X_OK), "apt-get install nginx (make test does)")
    local = tmp_path / "nginx.conf"
    local.write_text(
        text.replace("/etc/modelport/proxy", str(tmp_path)).replace("/run/", f"{tmp_path}/")
    )
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(local), "-e", str(tmp_path / "e.log")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def compose_layout(docker_mode: None, settings: Any, tmp_path: Path) -> Iterator[dict[str, str]]:
    """An nginx container and a network, as docker-compose.yml sets them up."""
    client = docker_client()
    installation = settings.MODELPORT_INSTALLATION_ID
    base = base_image_ensure(
        BaseImageSpec(
            image=settings.MODELPORT_BASE_IMAGE, local_image=settings.MODELPORT_LOCAL_BASE_IMAGE
        )
    )
    proxy_image = f"modelport/proxy-test:{installation}"
    image_build(
        REPO,
        ref=proxy_image,
        dockerfile="deployer/proxy/Dockerfile",
        build_args={"BASE_IMAGE": base},
        labels={MANAGED: installation},
        client=client,
    )
    network = client.networks.create(f"mp-{installation}-serving", labels={MANAGED: installation})
    routes = tmp_path / "routes"
    routes.mkdir()
    name = f"mp-{installation}-proxy-{uuid.uuid4().hex[:6]}"
    proxy = client.containers.run(
        proxy_image,
        name=name,
        detach=True,
        network=network.name,
        volumes={str(routes): {"bind": "/etc/modelport/proxy", "mode": "ro"}},
        labels={MANAGED: installation},
    )
    try:
        proxy.reload()
        address = proxy.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        url = f"http://{address}:8080"
        wait_for(lambda: _answers(f"{url}/healthz"), timeout_s=30, what="the nginx container")
        settings.MODELPORT_DOCKER_NETWORK = network.name
        settings.MODELPORT_PROXY = "external"
        settings.MODELPORT_PROXY_DIR = routes
        settings.MODELPORT_PROXY_CONTAINER = name
        settings.MODELPORT_PROXY_URL = url
        settings.MODELPORT_PROXY_CHECK_URL = url
        yield {"url": url, "network": network.name}
    finally:
        for instance in engine.runtime().owned():
            engine.runtime().stop(instance.handle, grace_s=1)
        proxy.remove(force=True)
        network.remove()
        with contextlib.suppress(Exception):
            client.images.remove(proxy_image)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_containers_on_a_network_behind_an_nginx_container(
    compose_layout: dict[str, str], personas: Personas, tmp_path: Path
) -> None:
    model = Model.objects.create(team=personas.acme, name="demo")
    expected = []
    versions = []
    for index in range(2):
        path = tmp_path / f"m{index}.onnx"
        weight, bias = linear_model(path, seed=random.randrange(1 << 30))
        expected.append(np.array(X) @ weight + bias)
        version = registry_services.version_upload(
            model=model,
            file=SimpleUploadedFile(path.name, path.read_bytes()),
            user=personas.bob.user,
        )
        registry_services.version_process(version_id=version.pk)
        registry_services.version_build(version_id=version.pk)
        version.refresh_from_db()
        assert version.is_ready, version.error
        versions.append(version)

    for version, answer in zip(versions, expected, strict=True):
        revision = services.deployment_deploy(
            version=version, name="production", user=personas.bob.user
        )
        services.revision_rollout(revision_id=revision.pk)
        deployment = Deployment.objects.get(pk=revision.deployment_id)
        assert deployment.status == DeploymentStatus.RUNNING, deployment.error
        assert deployment.endpoint_url.startswith(f"{compose_layout['url']}/acme/demo/production/")
        # Reached over the shared network: no host port is published.
        attrs = docker_client().containers.get(deployment.current_revision.handle).attrs
        assert not any(attrs["NetworkSettings"]["Ports"].values())
        assert compose_layout["network"] in attrs["NetworkSettings"]["Networks"]
        response = requests.post(
            f"{deployment.endpoint_url}/infer",
            headers=inference_headers(deployment.endpoint_url),
            json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": X}]},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["outputs"][0]["data"], answer, rtol=1e-5)
