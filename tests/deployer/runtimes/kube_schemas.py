"""Validation against the official Kubernetes schemas of the two newest minor versions."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
from kubernetes_validate import utils


def newest_two() -> list[str]:
    """The two newest minor versions kubernetes-validate ships schemas for."""
    by_minor: dict[str, str] = {}
    for version in utils.all_versions():
        by_minor[utils.major_minor(version)] = version
    ordered = sorted(by_minor.values(), key=lambda v: tuple(int(p) for p in v.split(".")))
    return ordered[-2:]


def validate(manifest: dict[str, Any], version: str) -> None:
    """Raise kubernetes_validate.ValidationError unless the manifest is valid (strict:
    unknown fields are errors too)."""
    kubernetes_validate.validate(manifest, version, strict=True)
