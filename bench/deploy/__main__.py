"""Deploy benchmark: upload-to-ready, rollback, image and layer sizes, on the real engine.

    .venv/bin/python -m bench.deploy [--repeats 5] [--rate 0]

Runs the portal's own service functions in this process (no Celery hops: a real
worker adds one queue round trip per step) against the Docker engine, a managed nginx
and a local MLflow store, in a private data directory. The runtime image is built
first if needed (reported, not counted). Each repeat uploads a new small MLP and
times:

- upload -> version ready: validate, register in MLflow, build the model image;
- upload -> serving: the above plus rollout (container, ready, known answer, nginx
  switch) to the stable URL;
- rollback: to the previous version's existing image (no build), until the stable URL
  serves it.

Targets (issue 5): ready < 15 s, rollback < 10 s, model layer <= model + 1 MB.
Prints every repeat, then min / median / max; the machine is shared, so read the
spread before the median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serving.models import build_mlp
from deployer.runtimes.local import free_port

MB = 1024 * 1024


def _setup(data_dir: Path) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "MODELPORT_DATA_DIR": str(data_dir),
            "MODELPORT_RUNTIME": "docker",
            "MODELPORT_PROXY": "nginx",
            "MODELPORT_PROXY_LISTEN": f"127.0.0.1:{free_port('127.0.0.1')}",
            "MODELPORT_SECRET_KEY": "bench-only-" + "k" * 40,
            "MODELPORT_LOG_LEVEL": "WARNING",
        }
    )
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("CELERY_BROKER_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", "--no-input", verbosity=0)


def _stats(values: list[float]) -> str:
    return (
        f"min {min(values):6.2f}  median {statistics.median(values):6.2f}  max {max(values):6.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)

    data_dir = Path(tempfile.mkdtemp(prefix="modelport-bench-deploy-"))
    _setup(data_dir)
    import requests
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.files.uploadedfile import SimpleUploadedFile

    from deployer.images import docker_client, runtime_image_ensure
    from portal.accounts.services import membership_set, team_create
    from portal.core import engine
    from portal.deployments import services
    from portal.deployments.models import Deployment
    from portal.registry import services as registry
    from portal.registry.models import Model

    client = docker_client()
    started = time.monotonic()
    runtime = runtime_image_ensure(engine.image_config(), device="cpu")
    print(
        f"runtime image {runtime.ref}: {runtime.image.size_bytes / MB:.0f} MiB, "
        f"{'cached' if runtime.image.cached else 'built'} in {time.monotonic() - started:.1f} s"
    )
    team = team_create(slug="bench", name="Bench")
    user = User.objects.create_user("bench")
    from portal.accounts.choices import Role

    membership_set(team=team, user=user, role=Role.ADMIN)
    model = Model.objects.create(team=team, name="mlp")
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}

    def upload(seed: int, runtime_name: str = "docker") -> tuple[Any, dict[str, float]]:
        settings.MODELPORT_RUNTIME = runtime_name
        name = "production" if runtime_name == "docker" else "local"
        path = data_dir / f"mlp-{seed}.onnx"
        build_mlp(path, (64, 256, 256, 10), seed=seed)
        marks: dict[str, float] = {}
        t0 = time.monotonic()
        version = registry.version_upload(
            model=model, file=SimpleUploadedFile(path.name, path.read_bytes()), user=user
        )
        registry.version_process(version_id=version.pk)
        marks["validate+register"] = time.monotonic() - t0
        version.refresh_from_db()
        if not version.is_ready:
            registry.version_build(version_id=version.pk)
            version.refresh_from_db()
        assert version.is_ready, version.error
        marks["ready"] = time.monotonic() - t0
        revision = services.deployment_deploy(version=version, name=name, user=user)
        services.revision_rollout(revision_id=revision.pk)
        deployment = Deployment.objects.get(pk=revision.deployment_id)
        assert deployment.current_revision_id == revision.pk, deployment.error
        response = requests.post(f"{deployment.endpoint_url}/infer", json=body, timeout=10)
        assert response.status_code == 200, response.text
        marks["serving"] = time.monotonic() - t0
        marks["model_bytes"] = path.stat().st_size
        return version, marks

    def rollback(to_version: Any, runtime_name: str = "docker") -> float:
        settings.MODELPORT_RUNTIME = runtime_name
        name = "production" if runtime_name == "docker" else "local"
        deployment = Deployment.objects.get(model=model, name=name)
        t0 = time.monotonic()
        back = services.deployment_rollback(deployment=deployment, to_version=to_version, user=user)
        services.revision_rollout(revision_id=back.pk)
        deployment.refresh_from_db()
        assert deployment.current_revision_id == back.pk, deployment.error
        response = requests.post(f"{deployment.endpoint_url}/infer", json=body, timeout=10)
        assert response.status_code == 200
        return time.monotonic() - t0

    # New weights every run, so every model image is really built (never found cached).
    base_seed = int(time.time())
    # Warm-up (not counted): MLflow store, first nginx start, first container.
    previous, _ = upload(seed=base_seed + 1000)
    previous_local, _ = upload(seed=base_seed + 2000, runtime_name="local")
    rows = []
    try:
        for repeat in range(args.repeats):
            version, marks = upload(seed=base_seed + repeat)
            marks["rollback"] = rollback(previous)
            # The same steps side by side on local processes (no image, no container).
            local_version, local = upload(seed=base_seed + 100 + repeat, runtime_name="local")
            marks["local_ready"], marks["local_serving"] = local["ready"], local["serving"]
            marks["local_rollback"] = rollback(previous_local, runtime_name="local")
            image = version.report["image"]
            marks["image_bytes"] = image["image_size_bytes"]
            marks["layer_bytes"] = image["image_model_layer_bytes"]
            marks["build_s"] = image["image_build_seconds"]
            rows.append(marks)
            print(
                f"repeat {repeat + 1}: docker: upload->ready {marks['ready']:.2f} s "
                f"(validate+register {marks['validate+register']:.2f}, build "
                f"{marks['build_s']:.2f}), upload->serving {marks['serving']:.2f} s, rollback "
                f"{marks['rollback']:.2f} s | local: ready {local['ready']:.2f}, serving "
                f"{local['serving']:.2f}, rollback {marks['local_rollback']:.2f} s | model "
                f"{marks['model_bytes'] / 1024:.0f} KiB, layer {marks['layer_bytes'] / 1024:.0f} "
                f"KiB, image {marks['image_bytes'] / MB:.1f} MiB",
                flush=True,
            )
            previous, previous_local = version, local_version
    finally:
        settings.MODELPORT_RUNTIME = "docker"
        for runtime_engine in (engine.runtime_named("docker"), engine.runtime_named("local")):
            for instance in runtime_engine.owned():
                runtime_engine.stop(instance.handle, grace_s=1)
        proxy = engine.proxy()
        if proxy is not None:
            proxy.stop()
        for version in model.versions.all():
            if version.image_ref:
                with contextlib.suppress(Exception):
                    client.images.remove(version.image_ref)
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)

    ready = [r["ready"] for r in rows]
    serving = [r["serving"] for r in rows]
    rollback_s = [r["rollback"] for r in rows]
    layer_over = [(r["layer_bytes"] - r["model_bytes"]) / 1024 for r in rows]
    size = rows[0]["model_bytes"] / 1024
    print(f"\n{args.repeats} repeats, small MLP 64-256-256-10 ({size:.0f} KiB), seconds")
    print(f"docker upload -> version ready : {_stats(ready)}   target < 15")
    print(f"docker upload -> serving at URL: {_stats(serving)}   target < 15")
    print(f"docker rollback                : {_stats(rollback_s)}   target < 10")
    print(f"local  upload -> serving at URL: {_stats([r['local_serving'] for r in rows])}")
    print(f"local  rollback                : {_stats([r['local_rollback'] for r in rows])}")
    print(
        f"model image {statistics.median([r['image_bytes'] for r in rows]) / MB:.1f} MiB; its own "
        f"layer is the model + {statistics.median(layer_over):.1f} KiB (target: + 1024 KiB)"
    )
    print(
        "medians as a share of the target: ready "
        f"{statistics.median(ready) / 15:.2f}, serving {statistics.median(serving) / 15:.2f}, "
        f"rollback {statistics.median(rollback_s) / 10:.2f}"
    )
    print(
        "docker / local, same repeat (median of ratios): serving "
        f"{statistics.median([r['serving'] / r['local_serving'] for r in rows]):.2f}, rollback "
        f"{statistics.median([r['rollback'] / r['local_rollback'] for r in rows]):.2f}"
    )
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
