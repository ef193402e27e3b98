"""The base image every ModelPort image starts FROM.

The base is a setting (default ``python:3.11-slim``). When the engine has it, it
is used as is (ModelPort never pulls). Hosts without it (air-gapped sites, and our
own CI) build an equivalent image from the distribution's packages instead:
``debootstrap`` of a minimal Debian with Python 3 into a temporary folder, then
``docker import``. The package mirror is read from the host's APT sources at run
time, so no mirror is ever written into the code.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.images.build import (
    BuildError,
    BuiltImage,
    LogSink,
    build_lock,
    describe,
    docker_client,
    image_get,
    no_log,
)
from deployer.images.names import check_reference, split_reference
from deployer.units import format_bytes

DEFAULT_BASE_IMAGE = "python:3.11-slim"
DEFAULT_LOCAL_BASE_IMAGE = "modelport/base:bookworm-python3.11"
# What the local build installs: the interpreter, venv (for the images' own
# virtualenvs) and CA certificates, as python:3.11-slim has them.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# The Python of the base image; wheels are downloaded for it (bookworm ships 3.11).
PYTHON_VERSION = "3.11"
APT_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))
# Removed from the root file system before import, as the slim images do.
_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "var/log",
)


@dataclass(frozen=True)
class BaseImageSpec:
    """Which base image to use, and whether this host may build one locally."""

    image: str = DEFAULT_BASE_IMAGE
    local_image: str = DEFAULT_LOCAL_BASE_IMAGE
    build_locally: bool = True
    suite: str = "bookworm"
    work_dir: Path | None = None


def base_image_ensure(
    spec: BaseImageSpec, *, client: Any = None, log: LogSink = no_log, lock_dir: Path | None = None
) -> str:
    """Make sure a base image exists and return its reference.

    The configured image when the engine has it (nothing is pulled); otherwise the local
    build (made now when missing and ``spec.build_locally`` allows it).
    """
    check_reference(spec.image)
    check_reference(spec.local_image)
    client = client or docker_client()
    if image_get(client, spec.image) is not None:
        return spec.image
    # Never pulled: hosts without a registry answer a pull with an error after a wait, on
    # every build. An operator who wants the configured image pulls it once (docker pull).
    with build_lock(lock_dir or Path(tempfile.gettempdir()), spec.local_image):
        if image_get(client, spec.local_image) is not None:
            log(f"Using the local base image {spec.local_image}")
            return spec.local_image
        if not spec.build_locally:
            raise BuildError(
                f"The base image {spec.image} is not on this Docker engine (ModelPort does "
                f"not pull it), and building one locally is switched off. Pull it with "
                f"`docker pull {spec.image}` where a registry answers, or run `manage.py "
                f"build_base_image` on the Docker host, or set MODELPORT_BASE_IMAGE to an "
                "image the engine has."
            )
        base_image_build(spec.local_image, suite=spec.suite, work_dir=spec.work_dir, log=log)
    return spec.local_image


def apt_mirror(suite: str, sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """The host's Debian mirror for ``suite``, read from its APT sources."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(source.glob("*.sources")) + sorted(source.glob("*.list"))
        elif source.is_file():
            files.append(source)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        found = (
            _mirror_deb822(text, suite) if path.suffix == ".sources" else _mirror_list(text, suite)
        )
        if found:
            return found
    raise BuildError(
        f"No APT source for Debian {suite} was found on this host (looked in "
        f"{', '.join(str(s) for s in sources)}); the local base image needs one."
    )


def _mirror_deb822(text: str, suite: str) -> str:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        if suite in fields.get("suites", "").split() and fields.get("uris"):
            return fields["uris"].split()[0]
    return ""


def _mirror_list(text: str, suite: str) -> str:
    for line in text.splitlines():
        words = [w for w in line.split() if not (w.startswith("[") or w.endswith("]"))]
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            return words[1]
    return ""


def base_image_build(
    ref: str,
    *,
    suite: str = "bookworm",
    mirror: str = "",
    work_dir: Path | None = None,
    log: LogSink = no_log,
    client: Any = None,
) -> BuiltImage:
    """Build a minimal Debian + Python 3 base image with debootstrap and import it as ``ref``.

    Needs root and ``debootstrap`` on the Docker host (they are what make a root
    file system without a registry). Takes about a minute.
    """
    check_reference(ref)
    if not re.fullmatch(r"[a-z]+", suite):
        raise BuildError(f"{suite!r} is not a Debian suite name.")
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else ""
    )
    if not debootstrap:
        raise BuildError(
            "debootstrap is not installed on this host, so no base image can be built here "
            "(apt-get install debootstrap, or set MODELPORT_BASE_IMAGE to an image the engine has)."
        )
    if os.geteuid() != 0:
        raise BuildError(
            "Building the base image needs root (debootstrap makes a root file system)."
        )
    mirror = mirror or apt_mirror(suite)
    client = client or docker_client(timeout_s=600)
    started = time.monotonic()
    prefix = f"modelport-base-{hashlib.sha256(ref.encode()).hexdigest()[:12]}-"
    root = work_dir or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, f"base-{ref}"):
        # A build killed half-way (worker crash) left its root file system here.
        for leftover in root.glob(f"{prefix}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return _build_locked(ref, suite, mirror, root, prefix, debootstrap, log, client, started)


def _build_locked(
    ref: str,
    suite: str,
    mirror: str,
    root: Path,
    prefix: str,
    debootstrap: str,
    log: LogSink,
    client: Any,
    started: float,
) -> BuiltImage:
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    rootfs = scratch / "rootfs"
    try:
        log(f"debootstrap {suite} (minbase + {', '.join(PACKAGES)})")
        _run_logged(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                suite,
                str(rootfs),
                mirror,
            ],
            log,
        )
        for relative in _TRIM:
            target = rootfs / relative
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir(mode=0o755)
        tarball = scratch / "rootfs.tar"
        log("Packing the root file system")
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True
        )
        repository, tag = split_reference(ref)
        log(f"Importing it as {ref}")
        client.api.import_image_from_file(
            str(tarball),
            repository=repository,
            tag=tag or "latest",
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                f"LABEL modelport.base=debootstrap-{suite}",
                'CMD ["python3"]',
            ],
        )
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"Building the base image failed: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    built = describe(client, ref, build_seconds=time.monotonic() - started, cached=False)
    log(f"Built {ref} ({format_bytes(built.size_bytes)}) in {built.build_seconds:.0f} s")
    return built


def _run_logged(command: list[str], log: LogSink) -> None:
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        line = line.rstrip()
        if line:
            tail = [*tail[-19:], line]
            log(line)
    if process.wait() != 0:
        raise BuildError(
            f"{Path(command[0]).name} failed with exit code {process.returncode}:\n"
            + "\n".join(tail)
        )
