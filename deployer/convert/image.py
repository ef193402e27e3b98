"""The converter images: one per framework family, each with its converters and nothing else.

``core`` holds PyTorch (CPU), scikit-learn and their ONNX exporters; ``trees`` holds
XGBoost, LightGBM and CatBoost with onnxmltools; ``tensorflow`` holds TensorFlow (CPU),
Keras 3 and tf2onnx; ``transformers`` holds PyTorch (CPU) and transformers. Conversion
containers start from the image of the format's family (``deployer.convert.formats.family_of``).

Each is made with the images package's reusable parts (base image, host-side
wheelhouse, ``image_build``): the wheels are downloaded on the host once and
installed offline in a build stage, and only the virtualenv and the engine files
the conversion job imports are copied into the final image, which runs as an
unprivileged user. Its tag is a hash of everything that goes in, so a change to a
pin or to the job's code makes a new image and nothing else does; once it is built,
the image it supersedes and its build stage are removed, so one converter image per
family stays on the engine.

The pins are the versions installed next to this code (the onnx and onnxruntime
that validate and serve the result), and ``torch==2.13.0``, never an open range:
an open range resolves to a multi-GB CUDA build. Heavy frameworks live only here,
never in the portal's own installation.
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
from deployer.images.build import BUILD_TIMEOUT_S, checkout_label, image_replace, no_log
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


@dataclass(frozen=True)
class Family:
    """One converter image's content: what it pins and what its build imports to check."""

    name: str
    # Pinned to the versions installed next to this code.
    local: tuple[str, ...]
    # Pinned here: frameworks that are never installed next to the portal.
    pins: tuple[str, ...]
    imports: str


# The tree frameworks' newest releases that still support Python 3.11 (the base image's);
# xgboost-cpu is XGBoost without the CUDA libraries the plain wheel pulls in.
TREES_PINS = (
    "xgboost-cpu==3.2.0",
    "lightgbm==4.7.0",
    "catboost==1.2.10",
    "onnxmltools==1.16.0",
)

# TensorFlow's newest CPU build for Python 3.11, with Keras 3 and tf2onnx.
TENSORFLOW_PINS = ("tensorflow-cpu==2.20.0", "tf2onnx==1.17.0")
TRANSFORMERS_PINS = (TORCH_PIN, "transformers==5.24.0")

FAMILIES: dict[str, Family] = {
    "core": Family("core", _DISTRIBUTIONS, (TORCH_PIN,), "torch, skl2onnx, skops"),
    "trees": Family(
        "trees",
        ("numpy", "onnx", "onnxruntime", "protobuf", "scikit-learn", "scipy", "skl2onnx"),
        TREES_PINS,
        "xgboost, lightgbm, catboost, onnxmltools",
    ),
    "tensorflow": Family(
        "tensorflow",
        ("numpy", "onnx", "onnxruntime", "protobuf"),
        TENSORFLOW_PINS,
        "tensorflow, keras, tf2onnx",
    ),
    "transformers": Family(
        "transformers",
        ("numpy", "onnx", "onnxruntime", "scikit-learn"),
        TRANSFORMERS_PINS,
        "torch, transformers",
    ),
}

# The engine files the conversion job imports (and nothing of the portal).
_SOURCES = (
    "__init__.py",
    "errors.py",
    "onnx_inspect.py",
    "sandbox.py",
    "samples.py",
    "signature.py",
    "serving/__init__.py",
    "serving/batch_axes.py",
    "serving/datatypes.py",
    "serving/errors.py",
)

# Classic builder (no BuildKit): wheels are installed in a build stage and only the
# virtualenv is copied on. Values come from build arguments and context files only;
# @IMPORTS@ is the family's import check (``dockerfile``). LightGBM needs the system's
# OpenMP runtime (libgomp.so.1), which neither base image has: scikit-learn's wheel
# carries a copy, linked where the loader finds it.
DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
COPY requirements.txt /wheels/
RUN python3 -m venv /opt/convert \\
 && /opt/convert/bin/python -m pip install --no-index --find-links /wheels \\
      --no-cache-dir --disable-pip-version-check --quiet -r /wheels/requirements.txt \\
 && mkdir -p /opt/convert/lib \\
 && ln -s /opt/convert/lib/python3*/site-packages/scikit_learn.libs/libgomp-*.so* \\
      /opt/convert/lib/libgomp.so.1
ENV LD_LIBRARY_PATH=/opt/convert/lib
COPY app/ /app/
RUN /opt/convert/bin/python -m compileall -q /app \\
 && cd /app && /opt/convert/bin/python -c "import deployer.convert.job, @IMPORTS@"

FROM ${BASE_IMAGE}
COPY --from=build /opt/convert /opt/convert
COPY --from=build /app /app
RUN useradd --system --uid 10001 --user-group --no-create-home \\
      --home-dir /nonexistent --shell /usr/sbin/nologin sandbox \\
 && mkdir -p /work && chown 10001:10001 /work
ENV PATH=/opt/convert/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \\
    LD_LIBRARY_PATH=/opt/convert/lib \\
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


def dockerfile(family: str = "core") -> str:
    """The family's Dockerfile: the common one with the family's import check."""
    return DOCKERFILE.replace("@IMPORTS@", family_get(family).imports)


def family_get(name: str) -> Family:
    """The converter family called ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise BuildError(
            f"There is no converter family {name!r}; choose one of {', '.join(FAMILIES)}."
        ) from None


def converter_requirements(family: str = "core") -> tuple[str, ...]:
    """The converter image's pinned requirements."""
    chosen = family_get(family)
    pins = list(chosen.pins)
    for name in chosen.local:
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
    *,
    base_id: str,
    requirements: tuple[str, ...],
    sources: dict[str, bytes],
    family: str = "core",
) -> str:
    """The content hash that names a converter image."""
    digest = hashlib.sha256()
    digest.update(dockerfile(family).encode())
    digest.update(json.dumps({"base": base_id, "requirements": list(requirements)}).encode())
    for name, content in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def converter_repository(config: ImageConfig, family: str = "core") -> str:
    """``<repository>/converter`` for the core family, ``.../converter-<family>`` for others."""
    return config.repo("converter" if family == "core" else f"converter-{family_get(family).name}")


def converter_image_ensure(
    config: ImageConfig, *, family: str = "core", log: LogSink = no_log, client: Any = None
) -> ConverterImage:
    """Make sure the family's converter image exists (built once per content); return it."""
    client = client or docker_client(timeout_s=BUILD_TIMEOUT_S)
    locks = config.cache_dir / "locks"
    base_ref = base_image_ensure(config.base, client=client, log=log, lock_dir=locks)
    base = image_get(client, base_ref)
    if base is None:
        raise BuildError(f"The base image {base_ref} disappeared from the engine.")
    requirements = converter_requirements(family)
    sources = converter_sources()
    content = converter_version(
        base_id=str(base.id), requirements=requirements, sources=sources, family=family
    )
    ref = reference(converter_repository(config, family), f"{deployer.__version__}-{content[:12]}")
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
            dockerfile=dockerfile(family),
            requirement_files={"requirements.txt": requirements},
            house=house,
            sources=sources,
            base_ref=base_ref,
            labels={
                f"{LABEL_PREFIX}converter-version": content,
                f"{LABEL_PREFIX}converter-family": family,
                f"{LABEL_PREFIX}checkout": checkout_label(),
            },
            log=log,
            client=client,
        )
        # A change of code makes a new tag: the one it replaces and the build stage go.
        image_replace(
            client,
            built,
            same={f"{LABEL_PREFIX}kind": "converter", f"{LABEL_PREFIX}checkout": checkout_label()},
            log=log,
        )
        return ConverterImage(ref, content, base_ref, built)
