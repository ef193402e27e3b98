"""Listing and removing this installation's model images, and nothing else.

Only images that carry this installation's label and ``modelport.kind=model`` are
listed or removed: runtime, base and converter images (shared by every model) and
other installations' images are never touched. Removal never forces: an image that
any container still uses (running or not) stays, and so does an image with other
tags (only the given tag goes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployer.images.names import LABEL_PREFIX, check_reference

INSTALLATION_LABEL = f"{LABEL_PREFIX}installation"
KIND_LABEL = f"{LABEL_PREFIX}kind"


@dataclass(frozen=True)
class ModelImageInfo:
    """One model image of this installation on the engine."""

    image_id: str
    tags: tuple[str, ...]
    size_bytes: int
    labels: dict[str, str]


@dataclass(frozen=True)
class ImageRemoval:
    """What happened to one tag: removed, already absent, or kept (and why)."""

    ref: str
    removed: bool
    reason: str = ""

    @property
    def gone(self) -> bool:
        """Whether the engine no longer has the tag (removed now or before)."""
        return self.removed or self.reason == "absent"


def model_images(client: Any, *, installation: str) -> list[ModelImageInfo]:
    """This installation's model images (by label, so nothing else is listed)."""
    images = client.images.list(
        filters={"label": [f"{INSTALLATION_LABEL}={installation}", f"{KIND_LABEL}=model"]}
    )
    return [
        ModelImageInfo(
            image_id=str(image.id),
            tags=tuple(image.tags),
            size_bytes=int(image.attrs.get("Size", 0)),
            labels=dict(image.labels or {}),
        )
        for image in images
    ]


def model_image_remove(client: Any, ref: str, *, installation: str) -> ImageRemoval:
    """Remove the model image tag ``ref`` if it is ours and no container uses it.

    Idempotent: a tag that is already gone reports ``reason="absent"``. Never forces
    a removal; a refusal is reported with the reason, never raised.
    """
    import requests
    from docker.errors import APIError, ImageNotFound

    check_reference(ref)
    try:
        image = client.images.get(ref)
    except ImageNotFound:
        return ImageRemoval(ref, removed=False, reason="absent")
    labels = image.labels or {}
    if labels.get(INSTALLATION_LABEL) != installation or labels.get(KIND_LABEL) != "model":
        return ImageRemoval(ref, removed=False, reason="not a model image of this installation")
    users = client.containers.list(all=True, filters={"ancestor": image.id})
    if users:
        names = ", ".join(sorted(str(c.name) for c in users)[:3])
        return ImageRemoval(ref, removed=False, reason=f"in use by container {names}")
    try:
        client.images.remove(ref, force=False, noprune=False)
    except ImageNotFound:
        return ImageRemoval(ref, removed=False, reason="absent")
    except APIError as exc:  # 409: a container appeared meanwhile, or a child image
        detail = str(exc.explanation or exc).splitlines()[0][:300]
        return ImageRemoval(ref, removed=False, reason=f"the engine refused: {detail}")
    except requests.exceptions.RequestException as exc:
        # A busy engine may finish the removal after we stopped waiting; the next
        # run finds the tag absent. Removal is idempotent, so nothing is retried here.
        return ImageRemoval(
            ref, removed=False, reason=f"the engine did not answer in time ({type(exc).__name__})"
        )
    return ImageRemoval(ref, removed=True)
