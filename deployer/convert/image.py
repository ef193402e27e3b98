"""The converter image: PyTorch (CPU), scikit-learn and the ONNX converters, nothing else.

Conversion containers start from it. It is made with the images package's reusable
parts (base image, host-side wheelhouse, ``image_build``): the wheels are
downloaded on the host once and installed offline in a build stage, and only the
virtualenv and the engine files the conversion job imports are copied into the
final image, which runs as an unprivileged user. Its tag is a hash of everything
that goes in, so a change to a pin or to the job's code makes a new image and
nothing else does.

The pins are the versions installed next to this code (the onnx and onnxruntime
that validate and serve the result), and ``torch==2.13.0``, never an open range:
an open range resolves to a multi-GB CUDA build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import deployer
from deployer.images import (
    BuildError,
    BuiltImage,
    ImageConfig,
    LogSink,
    base_image_ensure,
    build_lock,
    describe,
    docker_client,
    image_get,
    wheelhouse_ensure,
)
from deployer.images.build import BUILD_TIMEOUT_S, no_log
from deployer.images.names import LABEL_PREFIX, reference
from deployer.images.wheelhouse import check_requirement, python_app_image_build

SANDBOX_UID = 10001
WORK_DIR = "/work"
# The CPU build on the wheelhouse host's find-links; the same pin as the torch extra.
TORCH_PIN = "torch==2.13.0"
# Pinned to what is installed next to this code when present (onnxscript: the
# exporter dynamo=True uses; the rest: the conversion and its check).
_DISTRIBUTIONS = (
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "scikit-learn",
    "scipy",
    "joblib",
    "skl2onnx",
    "skops",
)
# Fallbacks when a distribution is not installed here (onnxscript comes with the torch extra).
_FALLBACK = {"onnxscript": "onnxscript>=0.5"}

# The engine files the conversion job imports (and nothing of the portal).
_SOURCES = (
    "__init__.py",
    "errors.py",
    "sandbox.py",
    "samples.py",
    "signature.py",
    "serving/__init__.py",
    "serving/datatypes.py",
    "serving/errors.py",
)

# Classic builder (no BuildKit): wheels are installed in a build stage and only the
# virtualenv is copied on. Values come from build arguments and context files only.
DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
COPY requirements.txt /wheels/
RUN python3 -m venv /opt/convert \\
 && /opt/convert/bin/python -m pip install --no-index --find-links /wheels \\
      --no-cache-dir --disable-pip-version-check --quiet -r /wheels/requirements.txt
COPY app/ /app/
RUN /opt/convert/bin/python -m compileall -q /app \\
 && cd /app && /opt/convert/bin/python -c "import deployer.convert.job, torch, skl2onnx, skops"

FROM ${BASE_IMAGE}
COPY --from=build /opt/convert /opt/convert
COPY --from=build /app /app
RUN useradd --system --uid 10001 --user-group --no-create-home \\
      --home-dir /nonexistent --shell /usr/sbin/nologin sandbox \\
 && mkdir -p /work && chown 10001:10001 /work
ENV PATH=/opt/convert/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \\
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["/opt/convert/bin/python", "-m", "deployer.convert.job"]
"""


@dataclass(frozen=True)
class ConverterImage:
    """The converter image on the engine."""

    ref: str
    version: str
    base_ref: str
    image: BuiltImage


def converter_requirements() -> tuple[str, ...]:
    """The converter image's pinned requirements."""
    pins = [TORCH_PIN]
    for name in _DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            if name not in _FALLBACK:
                raise BuildError(
                    f"{name} is not installed next to ModelPort, so the converter image cannot "
                    "pin it. Install ModelPort with its dependencies."
                ) from None
            pins.append(_FALLBACK[name])
    return tuple(check_requirement(p) for p in sorted(pins))


def converter_sources() -> dict[str, bytes]:
    """The engine files copied into the image, by path relative to the repository root."""
    package = Path(deployer.__file__).resolve().parent
    files = {f"deployer/{name}": (package / name).read_bytes() for name in _SOURCES}
    for path in sorted((package / "convert").glob("*.py")):
        files[f"deployer/convert/{path.name}"] = path.read_bytes()
    return files


def converter_version(
    *, base_id: str, requirements: tuple[str, ...], sources: dict[str, bytes]
) -> str:
    """The content hash that names a converter image."""
    digest = hashlib.sha256()
    digest.update(DOCKERFILE.encode())
    digest.update(json.dumps({"base": base_id, "requirements": list(requirements)}).encode())
    for name, content in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def converter_image_ensure(
    config: ImageConfig, *, log: LogSink = no_log, client: Any = None
) -> ConverterImage:
    """Make sure the converter image exists (building it once per content); return it."""
    client = client or docker_client(timeout_s=BUILD_TIMEOUT_S)
    locks = config.cache_dir / "locks"
    base_ref = base_image_ensure(config.base, client=client, log=log, lock_dir=locks)
    base = image_get(client, base_ref)
    if base is None:
        raise BuildError(f"The base image {base_ref} disappeared from the engine.")
    requirements = converter_requirements()
    sources = converter_sources()
    content = converter_version(base_id=str(base.id), requirements=requirements, sources=sources)
    ref = reference(config.repo("converter"), f"{deployer.__version__}-{content[:12]}")
    with build_lock(locks, ref):
        if image_get(client, ref) is not None:
            return ConverterImage(ref, content, base_ref, describe(client, ref))
        log(f"Building the converter image {ref} (once per converter version)")
        house = wheelhouse_ensure(
            requirements, cache_dir=config.cache_dir, target=config.target, log=log
        )
        built = python_app_image_build(
            ref=ref,
            kind="converter",
            dockerfile=DOCKERFILE,
            requirement_files={"requirements.txt": requirements},
            house=house,
            sources=sources,
            base_ref=base_ref,
            labels={f"{LABEL_PREFIX}converter-version": content},
            log=log,
            client=client,
        )
        return ConverterImage(ref, content, base_ref, built)
