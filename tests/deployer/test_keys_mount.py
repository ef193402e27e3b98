"""Containers see their deployment's keys file through a read-only folder mount, and
see each atomic replacement of it (a file mount would keep the old inode)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from deployer.keys import CONTAINER_KEYS_DIR, KeyEntry, KeySet, key_sha256, write_keys_file
from deployer.runtimes.base import LaunchSpec
from deployer.runtimes.docker import DockerRuntime, DockerSettings


class _Recorder:
    """Records what the runtime asks the engine for (the real run is below)."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}
        self.containers = self

    def create(self, **options: Any) -> Any:
        self.options = options
        raise RuntimeError("recorded")

    def get(self, name: str) -> Any:
        from docker.errors import NotFound

        raise NotFound(name)


def test_docker_launch_mounts_the_keys_folder_read_only_and_passes_the_path(
    tmp_path: Path, docker_engine: None
) -> None:
    from deployer.images.build import docker_client

    keys_file = tmp_path / "keys" / "d7" / "keys.json"
    write_keys_file(keys_file, KeySet(keys=(KeyEntry(id="k_1", sha256=key_sha256("a")),)))
    recorder = _Recorder()
    runtime = DockerRuntime(
        DockerSettings(installation="keystest", log_dir=tmp_path / "logs"), client=recorder
    )
    spec = LaunchSpec(
        deployment_id=7, revision_id=1, model_name="demo", model_version="1",
        model_path=tmp_path / "model.onnx", image="modelport/runtime:x", keys_file=keys_file,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="recorded"):
        runtime.start(spec)
    options = recorder.options
    assert options["volumes"] == {str(keys_file.parent): {"bind": CONTAINER_KEYS_DIR, "mode": "ro"}}
    assert options["command"][-2:] == ["--keys-file", f"{CONTAINER_KEYS_DIR}/keys.json"]
    assert options["read_only"] is True

    # The same mount on a real container, as the unprivileged serving user.
    client = docker_client(timeout_s=60)
    image = next(
        tag
        for img in client.images.list()
        for tag in img.tags
        if tag.startswith("modelport/runtime:")
    )
    script = (
        "import json, time\n"
        f"p = '{CONTAINER_KEYS_DIR}/keys.json'\n"
        "seen = set()\n"
        "for _ in range(100):\n"
        "    seen.add(len(json.load(open(p))['keys']))\n"
        "    if 2 in seen: break\n"
        "    time.sleep(0.05)\n"
        "print(sorted(seen))\n"
    )
    container = client.containers.run(
        image, entrypoint=["/opt/modelport/bin/python", "-c", script],
        volumes=options["volumes"], user=options["user"], read_only=True,
        cap_drop=["ALL"], network_mode="none", detach=True,
    )  # fmt: skip
    try:
        time.sleep(1)
        write_keys_file(
            keys_file,
            KeySet(keys=(KeyEntry(id="k_1", sha256=key_sha256("a")),
                         KeyEntry(id="k_2", sha256=key_sha256("b")))),
        )  # fmt: skip
        result = container.wait(timeout=30)
        output = container.logs().decode()
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 0, output
    assert json.loads(output.strip().splitlines()[-1]) == [1, 2]


def _runtime_image(client: Any) -> str:
    return next(
        tag
        for img in client.images.list()
        for tag in img.tags
        if tag.startswith("modelport/runtime:")
    )


def _key_ids_seen_in_a_container(client: Any, volumes: dict[str, Any], path: str) -> list[str]:
    """Start the serving image as its unprivileged user with ``volumes`` and read ``path``."""
    script = f"import json; print(json.dumps([k['id'] for k in json.load(open('{path}'))['keys']]))"
    output = client.containers.run(
        _runtime_image(client), entrypoint=["/opt/modelport/bin/python", "-c", script],
        volumes=volumes, user="10001:10001", read_only=True, cap_drop=["ALL"],
        network_mode="none", remove=True,
    )  # fmt: skip
    return list(json.loads(output.decode().strip().splitlines()[-1]))


def _spec(keys_file: Path) -> LaunchSpec:
    return LaunchSpec(
        deployment_id=7, revision_id=1, model_name="demo", model_version="1",
        model_path=keys_file.parent / "model.onnx", image="modelport/runtime:x",
        keys_file=keys_file,
    )  # fmt: skip


def test_a_worker_in_a_container_names_the_keys_folder_as_the_docker_host_sees_it(
    tmp_path: Path, docker_engine: None
) -> None:
    """docker-compose with a bind-mounted data folder: the worker's /data is the host's
    HOST/…; the mount's source must be the host's path, or the container sees nothing."""
    from deployer.errors import LaunchError
    from deployer.images.build import docker_client

    worker_view = Path("/modelport-worker-view/data")  # exists only inside "the worker"
    host_view = tmp_path / "host-data"
    write_keys_file(
        host_view / "keys" / "d7" / "keys.json",
        KeySet(keys=(KeyEntry(id="k_host", sha256=key_sha256("a")),)),
    )
    recorder = _Recorder()
    settings = DockerSettings(
        installation="keystest", log_dir=tmp_path / "logs", host_data=(worker_view, host_view)
    )
    runtime = DockerRuntime(settings, client=recorder)
    with pytest.raises(RuntimeError, match="recorded"):
        runtime.start(_spec(worker_view / "keys" / "d7" / "keys.json"))
    volumes = recorder.options["volumes"]
    assert volumes == {str(host_view / "keys" / "d7"): {"bind": CONTAINER_KEYS_DIR, "mode": "ro"}}
    client = docker_client(timeout_s=60)
    assert _key_ids_seen_in_a_container(client, volumes, f"{CONTAINER_KEYS_DIR}/keys.json") == [
        "k_host"
    ]
    # A folder outside the shared data folder cannot be mounted: said so, nothing started.
    with pytest.raises(LaunchError, match="outside the data folder"):
        runtime.start(_spec(tmp_path / "elsewhere" / "keys.json"))


def test_a_named_keys_volume_is_mounted_read_only_and_each_deployment_reads_its_own_file(
    tmp_path: Path, docker_engine: None
) -> None:
    """docker-compose's layout: the workers' /data/keys is the volume modelport-keys."""
    import uuid

    from deployer.images.build import docker_client

    client = docker_client(timeout_s=60)
    name = f"modelport-test-keys-{uuid.uuid4().hex[:8]}"
    volume = client.volumes.create(name)
    try:
        mountpoint = Path(volume.attrs["Mountpoint"])  # the engine's host: this machine
        for deployment, key_id in ((7, "k_seven"), (8, "k_eight")):
            write_keys_file(
                mountpoint / f"d{deployment}" / "keys.json",
                KeySet(keys=(KeyEntry(id=key_id, sha256=key_sha256(key_id)),)),
            )
        recorder = _Recorder()
        settings = DockerSettings(
            installation="keystest", log_dir=tmp_path / "logs", keys_volume=name
        )
        with pytest.raises(RuntimeError, match="recorded"):
            DockerRuntime(settings, client=recorder).start(
                _spec(Path("/data/keys/d7/keys.json"))  # the worker's path of the file
            )
        options = recorder.options
        assert options["volumes"] == {name: {"bind": CONTAINER_KEYS_DIR, "mode": "ro"}}
        path = f"{CONTAINER_KEYS_DIR}/d7/keys.json"
        assert options["command"][-2:] == ["--keys-file", path]
        assert _key_ids_seen_in_a_container(client, options["volumes"], path) == ["k_seven"]
    finally:
        volume.remove(force=True)
