"""Docker images for ModelPort, built through the Docker SDK (no Django here).

The reusable API (also for other image kinds, e.g. a conversion sandbox):

- :func:`base_image_ensure` (``BaseImageSpec``): make sure the base image exists;
  the configured one when the engine has it or can pull it, else a local
  debootstrap build (``base_image_build``). Returns the reference to build FROM.
- :func:`wheelhouse_ensure`: make sure a host-side folder of wheels for these pinned
  requirements exists (cached under ``cache_dir``, keyed by the requirement set);
  copy its files into a build context and ``pip install --no-index`` them there.
- :func:`image_build`: build a context folder (with its own Dockerfile) into a
  reference, with labels, build arguments and a log callback; returns a
  :class:`BuiltImage` (id, size, size above the parent image, seconds).
- :func:`docker_client`, :func:`image_get`, :func:`describe`, :func:`build_lock`.

And ModelPort's own images: :func:`runtime_image_ensure` (the serving runtime,
once per runtime version) and :func:`model_image_ensure` (runtime + one model as
the last small layer, tagged by content); :func:`model_images` and
:func:`model_image_remove` list and safely remove this installation's model images.
``python -m deployer.images base`` builds the local base image from the command line.

Every name and tag passes :mod:`deployer.images.names`; user data enters an image
only as files in its build context, never as Dockerfile text or a shell word.
"""

from deployer.images.base import (
    DEFAULT_BASE_IMAGE,
    DEFAULT_LOCAL_BASE_IMAGE,
    BaseImageSpec,
    apt_mirror,
    base_image_build,
    base_image_ensure,
)
from deployer.images.build import (
    BuildError,
    BuiltImage,
    EngineUnavailable,
    LogSink,
    build_lock,
    describe,
    docker_client,
    engine_available,
    image_build,
    image_get,
)
from deployer.images.cleanup import (
    ImageRemoval,
    ModelImageInfo,
    model_image_remove,
    model_images,
)
from deployer.images.model import ModelImageRequest, model_image_ensure, model_image_ref
from deployer.images.names import InvalidImageName, check_labels, check_reference
from deployer.images.runtime import (
    ImageConfig,
    RuntimeImage,
    runtime_image_ensure,
    serving_requirements,
)
from deployer.images.wheelhouse import Wheelhouse, WheelTarget, wheelhouse_ensure

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "DEFAULT_LOCAL_BASE_IMAGE",
    "BaseImageSpec",
    "BuildError",
    "BuiltImage",
    "EngineUnavailable",
    "ImageConfig",
    "ImageRemoval",
    "InvalidImageName",
    "LogSink",
    "ModelImageInfo",
    "ModelImageRequest",
    "RuntimeImage",
    "WheelTarget",
    "Wheelhouse",
    "apt_mirror",
    "base_image_build",
    "base_image_ensure",
    "build_lock",
    "check_labels",
    "check_reference",
    "describe",
    "docker_client",
    "engine_available",
    "image_build",
    "image_get",
    "model_image_ensure",
    "model_image_ref",
    "model_image_remove",
    "model_images",
    "runtime_image_ensure",
    "serving_requirements",
    "wheelhouse_ensure",
]
