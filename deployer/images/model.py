"""The model image: a runtime image plus one ONNX model and its serving config.

The model and ``config.json`` are the last layer, so a model image costs the size
of the model plus a few kilobytes on top of the shared runtime image. It is tagged
by its content (the model's sha256, the config and the runtime image), so building
the same content again finds the image and does nothing. The model's name and
version are not in the image: the container gets them when it starts, so one image
serves every version that uploaded the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.convert.external_data import external_data_check
from deployer.errors import InvalidModel
from deployer.images.build import (
    BUILD_TIMEOUT_S,
    BuildError,
    BuiltImage,
    LogSink,
    build_lock,
    describe,
    docker_client,
    image_build,
    image_get,
    no_log,
)
from deployer.images.names import LABEL_PREFIX, check_labels, reference
from deployer.images.runtime import SERVING_PORTS, ImageConfig, RuntimeImage
from deployer.units import format_bytes

MODEL_DIR = "/model"
DOCKERFILE = """\
ARG RUNTIME_IMAGE
FROM ${RUNTIME_IMAGE}
COPY model/ /model/
"""
# Serving settings an image may carry (the rest are fixed by the image or the container).
SERVING_KEYS = frozenset(
    {
        "max_batch_size",
        "max_queue_delay_us",
        "max_inflight_batches",
        "intra_op_threads",
        "inter_op_threads",
        "graph_optimization_level",
        "execution_mode",
        "workers",
        "max_body_bytes",
        "drain_timeout_s",
        "access_log",
        "warmup",
    }
)


@dataclass(frozen=True)
class ModelImageRequest:
    """One model to package: its file, its digest, and the labels to put on the image."""

    model_path: Path
    model_sha256: str
    runtime: RuntimeImage
    labels: dict[str, str] = field(default_factory=dict)
    serving: dict[str, object] = field(default_factory=dict)
    # The version's recorded sample (its known answer), baked in to warm up with.
    warmup_sample: Path | None = None


WARMUP_FILE = "warmup.npz"


def serving_config(device: str, serving: dict[str, object], *, warmup: bool = False) -> bytes:
    """The ``config.json`` baked into a model image (model name and version come at start)."""
    unknown = set(serving) - SERVING_KEYS
    if unknown:
        raise BuildError(f"Serving settings not allowed in an image: {', '.join(sorted(unknown))}")
    config: dict[str, object] = {
        "model": f"{MODEL_DIR}/model.onnx",
        "host": "0.0.0.0",  # noqa: S104 - inside the container; the engine decides what is exposed
        "http_port": SERVING_PORTS["http"],
        "grpc_port": SERVING_PORTS["grpc"],
        "metrics_port": SERVING_PORTS["metrics"],
        "device": device,
        **({"warmup_sample": f"{MODEL_DIR}/{WARMUP_FILE}"} if warmup else {}),
        **serving,
    }
    return json.dumps(config, sort_keys=True, indent=1).encode() + b"\n"


def external_data_files(model_path: Path) -> list[str]:
    """The external data files the model names (every tensor, wherever it hides), relative
    to its folder; ``BuildError`` for one that would leave the folder or is missing."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    try:
        return external_data_check(proto, model_path.parent)
    except InvalidModel as exc:
        raise BuildError(exc.message) from exc


def _external_digest(model_path: Path, locations: list[str]) -> str:
    digest = hashlib.sha256()
    for location in locations:
        digest.update(location.encode())
        with (model_path.parent / location).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_image_ref(config: ImageConfig, request: ModelImageRequest) -> str:
    """The content tag: model sha256, its external data, serving config and runtime image."""
    if len(request.model_sha256) != 64 or not all(
        c in "0123456789abcdef" for c in request.model_sha256
    ):
        raise BuildError("The model's sha256 must be 64 lower-case hex digits.")
    content = hashlib.sha256()
    content.update(request.model_sha256.encode())
    if request.model_path.is_file():
        locations = external_data_files(request.model_path)
        if locations:
            content.update(_external_digest(request.model_path, locations).encode())
    warmup = request.warmup_sample
    content.update(serving_config(request.runtime.device, request.serving, warmup=bool(warmup)))
    if warmup is not None:
        content.update(hashlib.sha256(warmup.read_bytes()).hexdigest().encode())
    content.update(request.runtime.version.encode())
    tag = f"{request.model_sha256[:16]}-{request.runtime.device}-{content.hexdigest()[:16]}"
    return reference(config.repo("model"), tag)


def model_image_ensure(
    config: ImageConfig,
    request: ModelImageRequest,
    *,
    log: LogSink = no_log,
    client: Any = None,
) -> BuiltImage:
    """Make sure the model image exists (a no-op when the same content was built before)."""
    client = client or docker_client(timeout_s=BUILD_TIMEOUT_S)
    ref = model_image_ref(config, request)
    labels = check_labels(
        {
            **request.labels,
            f"{LABEL_PREFIX}kind": "model",
            f"{LABEL_PREFIX}model-sha256": request.model_sha256,
            f"{LABEL_PREFIX}runtime-image": request.runtime.ref,
            f"{LABEL_PREFIX}device": request.runtime.device,
        }
    )
    with build_lock(config.cache_dir / "locks", ref):
        if image_get(client, ref) is not None:
            log(f"{ref} already exists: same model, config and runtime")
            return describe(client, ref, parent_ref=request.runtime.ref)
        if not request.model_path.is_file():
            raise BuildError(f"The model file {request.model_path.name} is missing from storage.")
        with tempfile.TemporaryDirectory(prefix="modelport-model-") as scratch:
            context = Path(scratch)
            (context / "Dockerfile").write_text(DOCKERFILE)
            folder = context / "model"
            folder.mkdir()
            _link_or_copy(request.model_path, folder / "model.onnx")
            copied = [folder / "model.onnx"]
            for location in external_data_files(request.model_path):
                target = folder / location
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(request.model_path.parent / location, target)
                copied.append(target)
            warmup = request.warmup_sample
            (folder / "config.json").write_bytes(
                serving_config(request.runtime.device, request.serving, warmup=bool(warmup))
            )
            if warmup is not None:
                _link_or_copy(warmup, folder / WARMUP_FILE)
                copied.append(folder / WARMUP_FILE)
            folders = {p.parent for p in copied if p.parent != folder}
            for path in (folder, *folders, *copied, folder / "config.json"):
                # Readable by the runtime's user, writable by nobody in the container.
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            built = image_build(
                context,
                ref=ref,
                labels=labels,
                build_args={"RUNTIME_IMAGE": request.runtime.ref},
                log=log,
                client=client,
                parent_ref=request.runtime.ref,
            )
    log(
        f"Built {ref}: model layer {format_bytes(built.own_layer_bytes)}, image "
        f"{format_bytes(built.size_bytes)}, in {built.build_seconds:.1f} s"
    )
    return built


def _link_or_copy(source: Path, target: Path) -> None:
    # A copy, not a link: chmod on a hard link would change the stored upload too.
    shutil.copyfile(source, target)
