"""Async inference in a hardened container: the serving runtime (user 10001, read-only root,
no capabilities) spools into its deployment's folder through the mount the Docker runtime
makes, and the dispatcher (this process, as the portal's user) answers through the
container's port; both sides read what the other wrote."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from deployer.async_dispatch import Dispatcher, DispatchSettings, Target
from deployer.images.runtime import RUNTIME_UID
from deployer.runtimes.base import LaunchSpec
from deployer.runtimes.docker import CONTAINER_ASYNC_DIR, _async_mount
from deployer.serving.async_spool import Spool
from tests.onnx_models import linear_model

KEY = "mpk_async_docker_key_0123456789"


def test_a_container_spools_and_reads_answers_through_its_mount(
    runtime_image: Any, tmp_path: Path
) -> None:
    from deployer.images.build import docker_client

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    weight, bias = linear_model(model_dir / "model.onnx", seed=5)
    (model_dir / "config.json").write_text(
        json.dumps({"model": "/model/model.onnx", "model_name": "demo", "http_port": 8000,
                    "grpc_port": 0, "metrics_port": 0})
    )  # fmt: skip
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "keys.json").write_text(
        json.dumps({"version": 1, "public": False,
                    "keys": [{"id": "k_1", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]})
    )  # fmt: skip
    for path in (model_dir, keys):
        path.chmod(0o755)
    spool_dir = tmp_path / "async" / "d1"
    Spool(spool_dir).ensure()
    spec = LaunchSpec(
        deployment_id=1, revision_id=1, model_name="demo", model_version="1",
        model_path=model_dir / "model.onnx", async_dir=spool_dir, async_max_queue=50,
        async_callback_hosts="",
    )  # fmt: skip
    options: dict[str, Any] = {
        "command": ["--config", "/model/config.json", "--keys-file", "/modelport-keys/keys.json"],
        "volumes": {
            str(model_dir): {"bind": "/model", "mode": "ro"},
            str(keys): {"bind": "/modelport-keys", "mode": "ro"},
        },
    }
    _async_mount(options, spec, spool_dir)
    assert options["volumes"][str(spool_dir)] == {"bind": CONTAINER_ASYNC_DIR, "mode": "rw"}
    assert options["command"][-6:] == [
        "--async-dir", CONTAINER_ASYNC_DIR, "--async-max-queue", "50",
        "--async-callback-hosts", "",
    ]  # fmt: skip
    tmp_path.chmod(0o755)
    (tmp_path / "async").chmod(0o755)
    client = docker_client(timeout_s=60)
    container = client.containers.run(
        runtime_image.ref,
        command=options["command"],
        volumes=options["volumes"],
        group_add=options.get("group_add"),
        user=f"{RUNTIME_UID}:{RUNTIME_UID}",
        read_only=True,
        tmpfs={"/tmp": "rw,noexec,nosuid,nodev,size=64m"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        ports={"8000/tcp": ("127.0.0.1", None)},
        detach=True,
    )
    dispatcher: Dispatcher | None = None
    thread: threading.Thread | None = None
    try:
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
        base = f"http://127.0.0.1:{port}/v2/models/demo"
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, container.logs().decode()[-3000:]
            time.sleep(0.3)
        auth = {"Authorization": f"Bearer {KEY}"}
        x = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
        doc = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                           "data": x.ravel().tolist()}]}  # fmt: skip
        accepted = requests.post(
            f"{base}/infer", json=doc, headers={**auth, "Prefer": "respond-async"}, timeout=30
        )
        assert accepted.status_code == 202, (accepted.text, container.logs().decode()[-2000:])
        request_id = accepted.json()["id"]
        stored = spool_dir / "pending" / f"{request_id}.req"
        assert stored.stat().st_uid == RUNTIME_UID  # written by the container's user
        location = f"{base}/async/{request_id}"
        assert requests.get(location, headers=auth, timeout=30).status_code == 202

        target = Target(
            deployment_id=1, spool_dir=spool_dir, infer_url=f"{base}/infer", headers=auth
        )
        dispatcher = Dispatcher(lambda: [target], DispatchSettings())
        thread = threading.Thread(target=dispatcher.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while (polled := requests.get(location, headers=auth, timeout=30)).status_code == 202:
            assert time.monotonic() < deadline, "no answer"
            time.sleep(0.2)
        # The container read the answer the dispatcher wrote.
        assert polled.status_code == 200, polled.text
        out = np.array(polled.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(out, (x @ weight + bias).ravel(), rtol=1e-5)
    finally:
        if dispatcher is not None and thread is not None:
            dispatcher.stop()
            thread.join(timeout=30)
        container.remove(force=True)
        shutil.rmtree(spool_dir, ignore_errors=True)
