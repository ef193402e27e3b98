"""Image names, tags and labels: every one passes an allowlist before it reaches Docker.

Nothing a user types becomes Dockerfile text or a shell word. Names and tags that
reach the Docker API are checked here against Docker's own grammar (narrowed), and
label keys and values against a small safe alphabet.
"""

from __future__ import annotations

import re

from deployer.errors import DeployerError

# A repository: optional registry host[:port], then lower-case path components.
_REPOSITORY = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9.-]{0,252}[a-z0-9])?(?::[0-9]{1,5})?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+=, -]{0,512}$")

# Every label ModelPort puts on images and containers starts with this.
LABEL_PREFIX = "modelport."


class InvalidImageName(DeployerError):
    """A name, tag or label that is not in the allowlist."""

    code = "invalid_image_name"


def check_repository(name: str) -> str:
    """``name`` if it is a valid repository name (``registry:5000/team/runtime``)."""
    if len(name) > 255 or not _REPOSITORY.match(name):
        raise InvalidImageName(f"{name!r} is not a valid image repository name.")
    return name


def check_tag(tag: str) -> str:
    """``tag`` if it is a valid image tag."""
    if not _TAG.match(tag):
        raise InvalidImageName(f"{tag!r} is not a valid image tag.")
    return tag


def check_reference(ref: str) -> str:
    """``ref`` if it is ``repository[:tag][@sha256:digest]`` with every part valid."""
    rest, _, digest = ref.partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidImageName(f"{ref!r} has an invalid digest.")
    repository, tag = split_reference(rest)
    check_repository(repository)
    if tag:
        check_tag(tag)
    return ref


def split_reference(ref: str) -> tuple[str, str]:
    """(repository, tag) of ``repository[:tag]``; a port in the host is not a tag."""
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return ref, ""


def reference(repository: str, tag: str) -> str:
    """``repository:tag`` after checking both parts."""
    return f"{check_repository(repository)}:{check_tag(tag)}"


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """``labels`` if every key and value is in the allowlist."""
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidImageName(f"{key!r} is not an allowed label name.")
        if not _LABEL_VALUE.match(value):
            raise InvalidImageName(f"The value of label {key} has characters that are not allowed.")
    return dict(labels)
