"""The runtime image: the serving runtime and its pinned dependencies, nothing else.

Built once per runtime version: the version is a hash of the Dockerfile, the pinned
requirements, the serving runtime's source files, the base image and the device,
so any change to one of them makes a new image and nothing else does. The wheels
come from the host-side wheelhouse and are installed offline in a first build
stage; only the resulting virtualenv is copied into the final image, which runs
as an unprivileged user.

The pins are the versions installed next to this code: the onnxruntime that
validated a model and recorded its known answer is the one that serves it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import deployer
from deployer.images.base import BaseImageSpec, base_image_ensure
from deployer.images.build import (
    BUILD_TIMEOUT_S,
    BuildError,
    BuiltImage,
    LogSink,
    build_lock,
    checkout_label,
    describe,
    docker_client,
    image_get,
    image_replace,
    no_log,
)
from deployer.images.names import LABEL_PREFIX, check_repository, reference
from deployer.images.wheelhouse import (
    WheelTarget,
    check_requirement,
    python_app_image_build,
    wheelhouse_ensure,
)

DEVICES = ("cpu", "gpu")
# The first onnxruntime that refuses external data outside the model's folder itself (the
# floor in pyproject.toml); the GPU image, which cannot pin the CPU build's version, asks
# for at least this one.
ONNXRUNTIME_FLOOR = "1.24.1"
# What deployer/serving imports (its README keeps this list short).
SERVING_DISTRIBUTIONS = (
    "numpy",
    "httptools",
    "uvloop",
    "grpcio",
    "protobuf",
    "prometheus-client",
    "hyperframe",
)
RUNTIME_UID = 10001
SERVING_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}

# The classic builder (Docker 20.10 without BuildKit) has no RUN --mount, so the
# wheels are installed in a build stage and only the virtualenv is copied on.
# Every value comes from build arguments or files in the context, never from
# text pasted into this Dockerfile.
DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
COPY requirements.txt build-requirements.txt /wheels/
RUN python3 -m venv /opt/modelport \\
 && /opt/modelport/bin/python -m pip install --no-index --find-links /wheels \\
      --no-cache-dir --disable-pip-version-check --quiet -r /wheels/requirements.txt \\
 && python3 -m venv /opt/protoc \\
 && /opt/protoc/bin/python -m pip install --no-index --find-links /wheels \\
      --no-cache-dir --disable-pip-version-check --quiet -r /wheels/build-requirements.txt
COPY app/ /app/
WORKDIR /app
RUN /opt/protoc/bin/python -m deployer.serving.proto \\
 && /opt/modelport/bin/python -m compileall -q /app \\
 && /opt/modelport/bin/python -c "import deployer.serving.server, onnxruntime"

FROM ${BASE_IMAGE}
COPY --from=build /opt/modelport /opt/modelport
COPY --from=build /app /app
# CUDA libraries of the GPU variant come as wheels (nvidia-*); let the loader find them.
RUN find /opt/modelport -type d -path "*/site-packages/nvidia/*/lib" \\
      > /etc/ld.so.conf.d/modelport-nvidia.conf \\
 && ldconfig \\
 && useradd --system --uid 10001 --user-group --no-create-home \\
      --home-dir /nonexistent --shell /usr/sbin/nologin modelport
ENV PATH=/opt/modelport/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/modelport/bin/python", "-m", "deployer.serving"]
CMD ["--config", "/model/config.json"]
"""


@dataclass(frozen=True)
class ImageConfig:
    """Where images come from and go: base image, repository prefix, caches."""

    cache_dir: Path
    repository: str = "modelport"
    base: BaseImageSpec = field(default_factory=BaseImageSpec)
    target: WheelTarget = field(default_factory=WheelTarget)
    # The requirement for the GPU variant's onnxruntime; empty: onnxruntime-gpu with
    # the CUDA and cuDNN wheels, no newer than the CPU onnxruntime here.
    gpu_onnxruntime: str = ""

    def repo(self, kind: str) -> str:
        """``<repository>/<kind>``, e.g. ``modelport/runtime``."""
        return check_repository(f"{self.repository}/{kind}")


@dataclass(frozen=True)
class RuntimeImage:
    """A runtime image on the engine, and what it is made of."""

    ref: str
    version: str
    device: str
    base_ref: str
    image: BuiltImage


def serving_requirements(device: str, *, gpu_onnxruntime: str = "") -> tuple[str, ...]:
    """The pinned requirements of the serving runtime for ``device``."""
    if device not in DEVICES:
        raise BuildError(f"{device!r} is not a device (cpu or gpu).")
    ort = _installed("onnxruntime")
    pins = [f"{name}=={_installed(name)}" for name in SERVING_DISTRIBUTIONS]
    if device == "gpu":
        pins.append(gpu_onnxruntime or f"onnxruntime-gpu[cuda,cudnn]>={ONNXRUNTIME_FLOOR},<={ort}")
    else:
        pins.append(f"onnxruntime=={ort}")
    return tuple(check_requirement(p) for p in sorted(pins))


def build_requirements() -> tuple[str, ...]:
    """What the build stage needs to compile the gRPC .proto (not in the final image)."""
    try:
        return (f"grpcio-tools=={version('grpcio-tools')}",)
    except PackageNotFoundError:
        # Not installed here (it is a development tool): any release that fits the
        # pinned grpcio and protobuf, resolved together with them.
        return ("grpcio-tools",)


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError as exc:
        raise BuildError(
            f"{name} is not installed next to ModelPort, so its version cannot be pinned."
        ) from exc


def serving_sources() -> dict[str, bytes]:
    """The files of the serving runtime, by path relative to the repository root."""
    package = Path(deployer.__file__).resolve().parent
    files = {"deployer/__init__.py": (package / "__init__.py").read_bytes()}
    for path in sorted((package / "serving").rglob("*")):
        relative = path.relative_to(package.parent).as_posix()
        if (
            not path.is_file()
            or "__pycache__" in path.parts
            or path.name.startswith(".")
            or path.name.endswith(("_pb2.py", "_pb2_grpc.py", ".pyc"))
            or path.suffix not in (".py", ".proto", ".md")
        ):
            continue
        files[relative] = path.read_bytes()
    return files


def runtime_version(
    *,
    device: str,
    base_id: str,
    requirements: tuple[str, ...],
    build_reqs: tuple[str, ...],
    sources: dict[str, bytes],
    target: WheelTarget,
) -> str:
    """The content hash that names a runtime image."""
    digest = hashlib.sha256()
    digest.update(DOCKERFILE.encode())
    digest.update(
        json.dumps(
            {
                "device": device,
                "base": base_id,
                "requirements": list(requirements),
                "build": list(build_reqs),
                "python": target.python_version,
                "machine": target.machine,
            },
            sort_keys=True,
        ).encode()
    )
    for name, content in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def runtime_image_ensure(
    config: ImageConfig, *, device: str = "cpu", log: LogSink = no_log, client: Any = None
) -> RuntimeImage:
    """Make sure the runtime image for ``device`` exists (building it once); return it."""
    client = client or docker_client(timeout_s=BUILD_TIMEOUT_S)
    locks = config.cache_dir / "locks"
    base_ref = base_image_ensure(config.base, client=client, log=log, lock_dir=locks)
    base = image_get(client, base_ref)
    if base is None:
        raise BuildError(f"The base image {base_ref} disappeared from the engine.")
    requirements = serving_requirements(device, gpu_onnxruntime=config.gpu_onnxruntime)
    build_reqs = build_requirements()
    sources = serving_sources()
    runtime = runtime_version(
        device=device,
        base_id=str(base.id),
        requirements=requirements,
        build_reqs=build_reqs,
        sources=sources,
        target=config.target,
    )
    ref = reference(config.repo("runtime"), f"{deployer.__version__}-{device}-{runtime[:12]}")
    with build_lock(locks, ref):
        if image_get(client, ref) is not None:
            return RuntimeImage(ref, runtime, device, base_ref, describe(client, ref))
        log(f"Building the {device} runtime image {ref} (once per runtime version)")
        house = wheelhouse_ensure(
            requirements + build_reqs, cache_dir=config.cache_dir, target=config.target, log=log
        )
        built = python_app_image_build(
            ref=ref,
            kind="runtime",
            dockerfile=DOCKERFILE,
            requirement_files={
                "requirements.txt": requirements,
                "build-requirements.txt": build_reqs,
            },
            house=house,
            sources=sources,
            base_ref=base_ref,
            labels={
                f"{LABEL_PREFIX}runtime-version": runtime,
                f"{LABEL_PREFIX}device": device,
                f"{LABEL_PREFIX}checkout": checkout_label(),
            },
            log=log,
            client=client,
        )
        # The runtime it supersedes goes unless model images are built on it (rollbacks).
        image_replace(
            client,
            built,
            same={
                f"{LABEL_PREFIX}kind": "runtime",
                f"{LABEL_PREFIX}device": device,
                f"{LABEL_PREFIX}checkout": checkout_label(),
            },
            log=log,
        )
        return RuntimeImage(ref, runtime, device, base_ref, built)
