"""The portal's adapters to the engine in ``deployer``: built from settings, nothing else.

Only the deploy worker (and ``make run``'s supervisor) may reach the Docker engine.
The functions here that do say so; the ones the web process uses
(:func:`instance_logs`, :func:`engine_facts`, :func:`builds_images`) only read
settings and files in the data directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

from deployer.checks import Tolerance
from deployer.images.base import BaseImageSpec
from deployer.images.build import BUILD_TIMEOUT_S, BuiltImage, LogSink, docker_client
from deployer.images.model import ModelImageRequest, model_image_ensure
from deployer.images.runtime import ImageConfig, runtime_image_ensure
from deployer.logs import tail_lines
from deployer.proxy import NginxProxy, find_nginx
from deployer.runtimes.base import Runtime
from deployer.runtimes.docker import DockerRuntime, DockerSettings, log_path
from deployer.runtimes.gpus import parse_inventory
from deployer.runtimes.kube.manifests import KubeSettings
from deployer.runtimes.local import LocalProcessRuntime
from deployer.sandbox import Limits
from deployer.tracking import TrackingTarget

if TYPE_CHECKING:
    from portal.deployments.models import Revision

log = logging.getLogger(__name__)
_resolved: tuple[float, str] | None = None
_AUTO_RECHECK_S = 60.0


# ---------------------------------------------------------------- runtimes


def builds_images() -> bool:
    """Whether versions get a model image (the build step runs on the deploy worker)."""
    return settings.MODELPORT_RUNTIME in ("docker", "auto", "kubernetes")


def runtime_name() -> str:
    """The runtime new instances start on; ``auto`` asks the engine (deploy worker only)."""
    global _resolved
    configured: str = settings.MODELPORT_RUNTIME
    if configured != "auto":
        return configured
    if _resolved is None or time.monotonic() - _resolved[0] > _AUTO_RECHECK_S:
        from deployer.images.build import engine_available

        _resolved = (time.monotonic(), "docker" if engine_available() else "local")
    return _resolved[1]


def runtime() -> Runtime:
    """The runtime that runs new serving instances on this installation (deploy worker)."""
    return runtime_named(runtime_name())


def runtime_named(name: str) -> Runtime:
    """The runtime a revision was started on (its ``runtime`` field); local when unknown."""
    if name == "docker":
        return docker_runtime()
    if name == "kubernetes":
        return kubernetes_runtime()
    # Without a proxy, deployments keep their address by handing sockets between instances.
    return LocalProcessRuntime(
        local_state_dir(),
        host=settings.MODELPORT_SERVING_HOST,
        stable_address=proxy() is None and settings.MODELPORT_LOCAL_HANDOVER,
        gpu_devices=parse_inventory(settings.MODELPORT_GPU_DEVICES),
    )


def runtimes_in_use() -> list[Runtime]:
    """Every runtime that may own instances now (both, while ``auto`` finds an engine)."""
    names = {runtime_name()}
    if settings.MODELPORT_RUNTIME == "auto":
        names.add("local")
    return [runtime_named(name) for name in sorted(names)]


def batch_runtime() -> Runtime:
    """The runtime batch jobs' serving instances run on (the batch worker only).

    The same kind as deployments use, under an identity of its own (a separate state
    folder; containers labelled with a derived installation id), so reconcile never
    takes a job's instance for an orphan of a deployment.
    """
    if runtime_name() == "docker":
        return DockerRuntime(
            DockerSettings(
                installation=f"{settings.MODELPORT_INSTALLATION_ID[:29]}bat",
                log_dir=Path(settings.DATA_DIR) / "runtime" / "batch" / "logs",
                network=settings.MODELPORT_DOCKER_NETWORK,
                publish_host=settings.MODELPORT_DOCKER_PUBLISH_HOST,
                tmpfs_mb=settings.MODELPORT_CONTAINER_TMPFS_MB,
            )
        )
    return LocalProcessRuntime(
        Path(settings.DATA_DIR) / "runtime" / "batch" / "local",
        host=settings.MODELPORT_SERVING_HOST,
    )


def local_state_dir() -> Path:
    return Path(settings.DATA_DIR) / "runtime" / "local"


def docker_log_dir() -> Path:
    return Path(settings.DATA_DIR) / "runtime" / "docker" / "logs"


def docker_runtime() -> DockerRuntime:
    """The Docker runtime (connects to the engine on first use: deploy worker only)."""
    return DockerRuntime(
        DockerSettings(
            installation=settings.MODELPORT_INSTALLATION_ID,
            log_dir=docker_log_dir(),
            network=settings.MODELPORT_DOCKER_NETWORK,
            publish_host=settings.MODELPORT_DOCKER_PUBLISH_HOST,
            tmpfs_mb=settings.MODELPORT_CONTAINER_TMPFS_MB,
            host_data=(
                (Path(settings.DATA_DIR), Path(settings.MODELPORT_DOCKER_HOST_DATA_DIR))
                if settings.MODELPORT_DOCKER_HOST_DATA_DIR
                else None
            ),
            keys_volume=settings.MODELPORT_DOCKER_KEYS_VOLUME,
            gpu_devices=parse_inventory(settings.MODELPORT_GPU_DEVICES),
        )
    )


def kube_settings() -> KubeSettings:
    return KubeSettings(
        installation=settings.MODELPORT_INSTALLATION_ID,
        namespace=settings.MODELPORT_KUBE_NAMESPACE,
        registry=settings.MODELPORT_KUBE_REGISTRY,
        image_pull_secret=settings.MODELPORT_KUBE_IMAGE_PULL_SECRET,
        kserve=settings.MODELPORT_KUBE_KSERVE,
    )


def kubernetes_runtime() -> Runtime:
    """The Kubernetes runtime (kubeconfig when set, else in-cluster credentials)."""
    from deployer.runtimes.kube.runtime import KubernetesRuntime

    kubeconfig = settings.MODELPORT_KUBECONFIG
    return KubernetesRuntime(kube_settings(), kubeconfig=Path(kubeconfig) if kubeconfig else None)


def instance_logs(revision: Revision, *, tail: int = 200) -> str:
    """The last lines an instance wrote, read from files (never from the Docker engine).

    Local instances write their own log files; containers' output is copied into
    files by the deploy worker's log shipper. So the web process needs no socket.
    """
    if revision.runtime == "kubernetes" and revision.handle:
        return kubernetes_runtime().logs(revision.handle, tail=tail)
    path = instance_log_file(revision)
    return "" if path is None else tail_lines(path, tail)


def instance_log_file(revision: Revision) -> Path | None:
    """The file an instance's output goes to (what ``instance_logs`` reads)."""
    if not revision.handle:
        return None
    if revision.runtime == "docker":
        return log_path(docker_log_dir(), revision.handle)
    return LocalProcessRuntime(local_state_dir()).log_file(revision.handle)


# ---------------------------------------------------------------- images


def image_config() -> ImageConfig:
    return ImageConfig(
        cache_dir=Path(settings.MODELPORT_IMAGE_CACHE_DIR),
        repository=settings.MODELPORT_IMAGE_REPOSITORY,
        base=BaseImageSpec(
            image=settings.MODELPORT_BASE_IMAGE,
            local_image=settings.MODELPORT_LOCAL_BASE_IMAGE,
            build_locally=settings.MODELPORT_BASE_IMAGE_BUILD,
            work_dir=Path(settings.MODELPORT_IMAGE_CACHE_DIR) / "scratch",
        ),
        gpu_onnxruntime=settings.MODELPORT_GPU_ONNXRUNTIME,
    )


# ---------------------------------------------------------------- proxy


def proxy() -> NginxProxy | None:
    """The reverse proxy that gives deployments stable URLs, or None (direct URLs)."""
    mode: str = settings.MODELPORT_PROXY
    if mode == "none":
        return None
    if mode == "external":
        return NginxProxy(
            Path(settings.MODELPORT_PROXY_DIR),
            public_url=settings.MODELPORT_PROXY_URL,
            check_url=settings.MODELPORT_PROXY_CHECK_URL,
            reload_hook=_signal_proxy_container,
        )
    nginx = find_nginx()
    if not nginx and mode == "auto":
        return None
    return NginxProxy(
        Path(settings.MODELPORT_PROXY_DIR),
        public_url=settings.MODELPORT_PROXY_URL,
        check_url=settings.MODELPORT_PROXY_CHECK_URL,
        listen=settings.MODELPORT_PROXY_LISTEN,
        nginx=nginx,
        worker_processes=settings.MODELPORT_PROXY_WORKERS,
        grpc_host=settings.MODELPORT_PROXY_GRPC_HOST,
        grpc_public_host=settings.MODELPORT_PROXY_GRPC_PUBLIC_HOST,
        tls_cert=settings.MODELPORT_PROXY_TLS_CERT,
        tls_key=settings.MODELPORT_PROXY_TLS_KEY,
    )


def _signal_proxy_container() -> None:
    """Reload an nginx that runs in its own container (docker-compose): SIGHUP through Docker."""
    from deployer.images.build import docker_client

    name: str = settings.MODELPORT_PROXY_CONTAINER
    if not name:
        raise RuntimeError("MODELPORT_PROXY_CONTAINER names no container to reload")
    docker_client(timeout_s=30).containers.get(name).kill(signal="SIGHUP")


# ---------------------------------------------------------------- engine facts


def _facts_path() -> Path:
    return Path(settings.DATA_DIR) / "runtime" / "engine.json"


def engine_facts_record(**facts: Any) -> None:
    """Write what the deploy worker learnt about the engine, for processes that cannot ask."""
    path = _facts_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    current = engine_facts()
    current.update(facts, checked_at=datetime.now(UTC).isoformat())
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(current))
    os.replace(scratch, path)


def engine_facts() -> dict[str, Any]:
    """The last facts the deploy worker recorded (empty before it ran)."""
    try:
        loaded = json.loads(_facts_path().read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


# ---------------------------------------------------------------- other engine settings


def tracking_target() -> TrackingTarget:
    return TrackingTarget(
        tracking_uri=settings.MLFLOW_TRACKING_URI,
        experiment=settings.MLFLOW_EXPERIMENT,
        artifact_root=settings.MLFLOW_ARTIFACT_ROOT,
    )


def validation_limits() -> Limits:
    return Limits(
        memory_mb=settings.MODELPORT_VALIDATION_MEMORY_MB,
        timeout_s=float(settings.MODELPORT_VALIDATION_TIMEOUT_S),
    )


def known_answer_tolerance(device: str) -> Tolerance:
    # GPU kernels sum in another order than the CPU run that recorded the answer.
    return Tolerance(rtol=1e-2, atol=1e-3) if device == "gpu" else Tolerance()


def model_image(
    *,
    model_path: Path,
    sha256: str,
    device: str,
    labels: dict[str, str],
    log: LogSink,
    warmup_sample: Path | None = None,
) -> BuiltImage:
    """The model image for one model file (deploy worker only: it talks to Docker).

    Builds the runtime image first when this runtime version has none yet, and
    nothing at all when the same content was built before.
    """
    config = image_config()
    client = docker_client(timeout_s=BUILD_TIMEOUT_S)
    runtime_image = runtime_image_ensure(config, device=device, log=log, client=client)
    built = model_image_ensure(
        config,
        ModelImageRequest(
            model_path=model_path,
            model_sha256=sha256,
            runtime=runtime_image,
            labels=labels,
            warmup_sample=warmup_sample,
        ),
        log=log,
        client=client,
    )
    if settings.MODELPORT_RUNTIME == "kubernetes":
        # A cluster pulls its images: the version records the pushed name.
        from deployer.runtimes.kube.runtime import push_image

        built = replace(built, ref=push_image(built.ref, settings.MODELPORT_KUBE_REGISTRY))
    return built
