"""A host-side cache of wheels for a pinned requirement set.

``pip`` inside an image build may have no network (air-gapped hosts) or no way to
verify TLS; the host's pip has both, with the host's configuration. So wheels are
downloaded here once, for the image's Python and platform (``--only-binary``), kept
under the cache folder keyed by the requirement set, and copied into build contexts,
where ``pip install --no-index`` installs them offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deployer
from deployer.images.base import PYTHON_VERSION
from deployer.images.build import (
    BuildError,
    BuiltImage,
    LogSink,
    build_lock,
    image_build,
    no_log,
)
from deployer.images.names import LABEL_PREFIX
from deployer.units import format_bytes

MANIFEST = "manifest.json"
# manylinux tags the base images' glibc (Debian bookworm: 2.36) can load.
_GLIBC = (2, 36)
_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9_,.-]+\])?([<>=!~]=?[^\s;]+)?$")


@dataclass(frozen=True)
class WheelTarget:
    """The interpreter and platform the wheels are for."""

    python_version: str = PYTHON_VERSION
    machine: str = "x86_64"

    @property
    def platforms(self) -> tuple[str, ...]:
        legacy = ("manylinux1", "manylinux2010", "manylinux2014")
        tags = [f"manylinux_2_{minor}_{self.machine}" for minor in range(_GLIBC[1], 4, -1)]
        return (*tags, *(f"{name}_{self.machine}" for name in legacy))

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")


@dataclass(frozen=True)
class Wheelhouse:
    """A complete folder of wheels for one requirement set."""

    path: Path
    key: str
    requirements: tuple[str, ...]
    files: tuple[tuple[str, str], ...]  # (file name, sha256), sorted

    @property
    def digest(self) -> str:
        """A hash of exactly which wheels are in it (part of a runtime image's version)."""
        text = "\n".join(f"{name} {sha}" for name, sha in self.files)
        return hashlib.sha256(text.encode()).hexdigest()


def check_requirement(line: str) -> str:
    """``line`` if it is a plain ``name[extras](op)version`` requirement."""
    if not _REQUIREMENT.match(line):
        raise BuildError(f"{line!r} is not an allowed requirement (name and version only).")
    return line


def wheelhouse_key(requirements: Sequence[str], target: WheelTarget) -> str:
    """The cache key of a requirement set for a target."""
    payload = json.dumps(
        {
            "requirements": sorted(requirements),
            "python": target.python_version,
            "machine": target.machine,
            "platforms": list(target.platforms),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def wheelhouse_ensure(
    requirements: Sequence[str],
    *,
    cache_dir: Path,
    target: WheelTarget = WheelTarget(),
    log: LogSink = no_log,
) -> Wheelhouse:
    """Make sure a wheelhouse for these pinned requirements exists under ``cache_dir``.

    Downloads (with the host's pip and configuration) only when no complete
    wheelhouse for the same set is cached; a download that stops half-way leaves
    nothing behind that a later call would trust.
    """
    reqs = tuple(check_requirement(r) for r in requirements)
    key = wheelhouse_key(reqs, target)
    root = cache_dir / "wheelhouse"
    final = root / key
    with build_lock(root, f"wheelhouse-{key}"):
        existing = _load(final, reqs, key)
        if existing is not None:
            return existing
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            (scratch / "requirements.txt").write_text("\n".join(reqs) + "\n")
            log(f"Downloading wheels for {len(reqs)} requirements (Python {target.python_version})")
            _download(scratch, target, log)
            files = tuple(
                sorted((p.name, _sha256(p)) for p in scratch.iterdir() if p.suffix == ".whl")
            )
            (scratch / MANIFEST).write_text(
                json.dumps(
                    {"key": key, "requirements": list(reqs), "files": [list(f) for f in files]},
                    indent=1,
                )
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        house = _load(final, reqs, key)
        assert house is not None
        total = sum((final / name).stat().st_size for name, _ in house.files)
        log(f"Wheelhouse {key}: {len(house.files)} wheels, {format_bytes(total)}")
        return house


def _download(dest: Path, target: WheelTarget, log: LogSink) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--only-binary=:all:",
        "--python-version",
        target.python_version,
        "--implementation",
        "cp",
        "--abi",
        target.abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        *[arg for platform in target.platforms for arg in ("--platform", platform)],
        "--dest",
        str(dest),
        "--requirement",
        str(dest / "requirements.txt"),
    ]
    process = subprocess.run(command, capture_output=True, text=True, errors="replace")
    for line in process.stdout.splitlines():
        if line.startswith(("Saved", "Collecting", "Successfully")):
            log(line.strip())
    if process.returncode != 0:
        detail = "\n".join((process.stderr or process.stdout).strip().splitlines()[-12:])
        raise BuildError(
            f"The wheels could not be downloaded on this host (pip exit code "
            f"{process.returncode}). Check the host's access to the package index.\n{detail}"
        )


def _load(path: Path, reqs: tuple[str, ...], key: str) -> Wheelhouse | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = tuple((str(name), str(sha)) for name, sha in manifest.get("files", []))
    if manifest.get("key") != key or not files:
        return None
    if not all((path / name).is_file() for name, _ in files):
        return None
    return Wheelhouse(path=path, key=key, requirements=reqs, files=files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def python_app_image_build(
    *,
    ref: str,
    kind: str,
    dockerfile: str,
    requirement_files: dict[str, Sequence[str]],
    house: Wheelhouse,
    sources: dict[str, bytes],
    base_ref: str,
    labels: dict[str, str],
    log: LogSink,
    client: Any,
) -> BuiltImage:
    """Build a Python application image offline: the Dockerfile, its requirement files,
    the wheelhouse's wheels under ``wheels/`` and the application's files under ``app/``
    make the context; the base image comes in as the ``BASE_IMAGE`` build argument.

    Used by the runtime and converter images, which differ only in what they install.
    """
    with tempfile.TemporaryDirectory(prefix=f"modelport-{kind}-") as scratch:
        context = Path(scratch)
        (context / "Dockerfile").write_text(dockerfile)
        for name, lines in requirement_files.items():
            (context / name).write_text("\n".join(lines) + "\n")
        wheels = context / "wheels"
        wheels.mkdir()
        for name, _ in house.files:
            try:
                os.link(house.path / name, wheels / name)
            except OSError:
                shutil.copy2(house.path / name, wheels / name)
        for relative, data in sources.items():
            target = context / "app" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        built = image_build(
            context,
            ref=ref,
            labels={
                f"{LABEL_PREFIX}kind": kind,
                **labels,
                f"{LABEL_PREFIX}base-image": base_ref,
                f"{LABEL_PREFIX}wheelhouse": house.digest[:20],
                f"{LABEL_PREFIX}deployer-version": deployer.__version__,
            },
            build_args={"BASE_IMAGE": base_ref},
            log=log,
            client=client,
            parent_ref=base_ref,
        )
    log(
        f"Built {ref}: {format_bytes(built.size_bytes)}, {format_bytes(built.own_layer_bytes)} "
        f"above the base, in {built.build_seconds:.1f} s"
    )
    return built
