"""Build an image from a context folder through the Docker SDK, streaming its log.

This is the one place that runs ``docker build``. Everything user-provided enters
an image only as a file in the context folder; the Dockerfile is ModelPort's own
text, values reach it as build arguments, and names, tags and labels pass
:mod:`deployer.images.names` first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError
from deployer.images.names import check_labels, check_reference, split_reference

LogSink = Callable[[str], None]
"""Receives the build log line by line (without the trailing newline)."""

# Builds stream their progress, but one quiet step (unpacking a large wheel) can
# take minutes; the HTTP read timeout must be longer than any such step.
BUILD_TIMEOUT_S = 1800


class BuildError(DeployerError):
    """An image could not be built; the message ends with the last log lines."""

    code = "build_failed"


class EngineUnavailable(DeployerError):
    """The Docker engine does not answer."""

    code = "docker_unavailable"


def no_log(_line: str) -> None:
    """A log sink that drops everything."""


def docker_client(*, timeout_s: int = 120) -> Any:
    """A Docker SDK client for the engine named by ``DOCKER_HOST`` (or the local socket)."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except DockerException as exc:
        raise EngineUnavailable(
            f"The Docker engine does not answer ({_first_line(exc)}). Start it, or check "
            "DOCKER_HOST and that this process may use the Docker socket."
        ) from exc
    return client


def engine_available() -> bool:
    """Whether a Docker engine answers right now."""
    try:
        docker_client(timeout_s=5).close()
    except EngineUnavailable:
        return False
    return True


@dataclass(frozen=True)
class BuiltImage:
    """An image that exists on the engine."""

    ref: str
    image_id: str
    size_bytes: int
    # Bytes added by this image's own steps, on top of ``parent_ref`` (its FROM image).
    own_layer_bytes: int
    build_seconds: float
    cached: bool
    labels: dict[str, str] = field(default_factory=dict)
    # Ids of the build stages this build left (untagged images the final one copied from).
    stage_ids: tuple[str, ...] = ()


def image_get(client: Any, ref: str) -> Any | None:
    """The SDK image object for ``ref``, or None when the engine does not have it."""
    from docker.errors import ImageNotFound

    try:
        return client.images.get(check_reference(ref))
    except ImageNotFound:
        return None


def describe(
    client: Any, ref: str, *, parent_ref: str = "", build_seconds: float = 0, cached: bool = True
) -> BuiltImage:
    """What the engine knows about an existing image: id, size, own layer size, labels."""
    image = client.images.get(check_reference(ref))
    attrs = image.attrs
    own = int(attrs.get("Size", 0))
    if parent_ref:
        parent = image_get(client, parent_ref)
        if parent is not None:
            own = layers_above(image.history(), parent.history())
    return BuiltImage(
        ref=ref,
        image_id=str(image.id),
        size_bytes=int(attrs.get("Size", 0)),
        own_layer_bytes=own,
        build_seconds=build_seconds,
        cached=cached,
        labels=dict((attrs.get("Config") or {}).get("Labels") or {}),
    )


def layers_above(history: list[dict[str, Any]], parent_history: list[dict[str, Any]]) -> int:
    """Bytes in the newest history entries that the parent image does not have."""
    extra = len(history) - len(parent_history)
    return sum(int(entry.get("Size", 0)) for entry in history[: max(extra, 0)])


@contextlib.contextmanager
def build_lock(lock_dir: Path, ref: str) -> Iterator[None]:
    """Serialise builds of one reference on this host (two workers, one image)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(ref.encode()).hexdigest()[:24]
    with (lock_dir / f"build-{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def image_build(
    context_dir: Path,
    *,
    ref: str,
    labels: dict[str, str] | None = None,
    build_args: dict[str, str] | None = None,
    log: LogSink = no_log,
    client: Any = None,
    parent_ref: str = "",
    dockerfile: str = "Dockerfile",
) -> BuiltImage:
    """Build ``context_dir`` (which holds the Dockerfile) into ``ref``.

    ``log`` receives every line Docker prints. ``build_args`` fill the Dockerfile's
    ``ARG`` values (image references only: each is checked as one). Intermediate
    containers are removed even when a step fails. Returns the image's id, size and
    the size of the layers it added on top of ``parent_ref``.
    """
    check_reference(ref)
    checked_labels = check_labels(labels or {})
    args = dict(build_args or {})
    for value in args.values():
        check_reference(value)
    client = client or docker_client(timeout_s=BUILD_TIMEOUT_S)
    started = time.monotonic()
    tail: list[str] = []
    image_id = ""
    stages = _StageTracker()
    try:
        stream = client.api.build(
            path=str(context_dir),
            dockerfile=dockerfile,
            tag=ref,
            labels=checked_labels,
            buildargs=args,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                detail = str(chunk.get("error", "")).strip()
                raise BuildError(f"Building {ref} failed: {detail}\n" + "\n".join(tail[-20:]))
            if "aux" in chunk and isinstance(chunk["aux"], dict):
                image_id = str(chunk["aux"].get("ID", image_id))
            text = chunk.get("stream")
            if not text:
                continue
            for line in str(text).splitlines():
                line = line.rstrip()
                if line:
                    tail.append(line)
                    del tail[:-50]
                    stages.feed(line)
                    log(line)
    except BuildError:
        raise
    except Exception as exc:  # the SDK raises APIError, requests errors, timeouts alike
        raise BuildError(
            f"Building {ref} failed: {_first_line(exc)}\n" + "\n".join(tail[-20:])
        ) from exc
    if not image_id:
        raise BuildError(f"Building {ref} ended without an image.\n" + "\n".join(tail[-20:]))
    built = describe(
        client, ref, parent_ref=parent_ref, build_seconds=time.monotonic() - started, cached=False
    )
    return replace(built, stage_ids=tuple(stages.finished))


class _StageTracker:
    """Finds, in the classic builder's log, the image each earlier stage ended with."""

    _STEP = re.compile(r"^Step \d+/\d+ : FROM\b", re.IGNORECASE)
    _RESULT = re.compile(r"^ ---> ([0-9a-f]{12,64})$")

    def __init__(self) -> None:
        self.last = ""
        self.finished: list[str] = []
        self.started = False

    def feed(self, line: str) -> None:
        if self._STEP.match(line):
            if self.started and self.last:
                self.finished.append(self.last)
            self.started, self.last = True, ""
            return
        found = self._RESULT.match(line)
        if found:
            self.last = found.group(1)


def checkout_label() -> str:
    """Names the source tree this engine code runs from: a build replaces only images made
    from the same tree (two checkouts on one engine keep their own)."""
    import deployer

    root = str(Path(deployer.__file__).resolve().parent)
    return hashlib.sha256(root.encode()).hexdigest()[:16]


def image_replace(
    client: Any, built: BuiltImage, *, same: dict[str, str], log: LogSink = no_log
) -> list[str]:
    """After a successful build: remove the build stages it left, and the images it
    supersedes (same repository and the same ``same`` labels, another tag).

    An image a container still uses, or that other images are built on, stays (the
    engine refuses to remove it; that is said in the log). Returns what was removed.
    """
    from docker.errors import APIError, ImageNotFound

    removed: list[str] = []
    for stage in built.stage_ids:
        try:
            image = client.images.get(stage)
            if image.tags:
                continue
            client.images.remove(stage, noprune=False)
            removed.append(stage)
        except ImageNotFound:
            continue
        except APIError as exc:
            log(f"Kept build stage {stage}: {_first_line(exc)}")
    repository = split_reference(built.ref)[0]
    filters = {"label": [f"{k}={v}" for k, v in same.items()]}
    for image in client.images.list(name=repository, filters=filters):
        if str(image.id) == built.image_id:
            continue
        for tag in image.tags:
            if split_reference(tag)[0] != repository:
                continue
            try:
                client.images.remove(tag, noprune=False)
                removed.append(tag)
                log(f"Removed {tag}, superseded by {built.ref}")
            except ImageNotFound:
                continue
            except APIError as exc:
                log(f"Kept {tag} (superseded by {built.ref}): {_first_line(exc)}")
    return removed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__
