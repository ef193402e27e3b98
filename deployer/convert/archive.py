"""Extract an uploaded .zip or .tar.gz holding an ONNX model and its external data, safely.

Every entry is checked before a byte is written: relative paths only, no ``..``,
regular files and folders only (no links, devices or FIFOs), and caps on the
number of entries, the total size and the compression ratio. Sizes are counted
on the bytes actually written, so an archive that lies in its headers is stopped
too. ONNX's own rule, that external data stays in the model's folder, is checked
again when the model is validated.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from deployer.errors import InvalidModel

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may unpack to."""

    max_entries: int = 1000
    max_total_bytes: int = 8 * 1024 * 1024 * 1024
    # Uncompressed size over compressed size, for the whole archive and each zip entry.
    max_ratio: float = 200.0


@dataclass(frozen=True)
class ExtractedModel:
    """Where the archive's ONNX model landed, and what else came with it."""

    model_path: Path
    files: tuple[str, ...]
    total_bytes: int


class UnsafeArchive(InvalidModel):
    """An archive entry that would escape its folder, or an archive that unpacks too far."""

    code = "unsafe_archive"


def extract_onnx_archive(
    archive_path: Path, target: Path, *, limits: ArchiveLimits = ArchiveLimits()
) -> ExtractedModel:
    """Unpack the archive into ``target`` (created, and removed again on failure)."""
    target.mkdir(parents=True, exist_ok=False)
    try:
        with archive_path.open("rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK"):
            files, total = _extract_zip(archive_path, target, limits)
        else:
            files, total = _extract_tar(archive_path, target, limits)
        return ExtractedModel(model_path=_the_model(target, files), files=files, total_bytes=total)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def safe_member_path(name: str) -> PurePosixPath:
    """The entry's relative path, or ``UnsafeArchive`` if it could leave the target folder."""
    if not name or "\x00" in name:
        raise UnsafeArchive("The archive has an entry with an empty or invalid name.")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise UnsafeArchive(
            f"The archive entry {name!r} has an absolute path. Archive the model folder with "
            "relative paths (cd into it first)."
        )
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise UnsafeArchive(
            f"The archive entry {name!r} climbs out of its folder with '..'. Archive the model "
            "folder with plain relative paths."
        )
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise UnsafeArchive(f"The archive entry {name!r} has no file name.")
    return PurePosixPath(*parts)


def _extract_zip(
    archive_path: Path, target: Path, limits: ArchiveLimits
) -> tuple[tuple[str, ...], int]:
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidModel(
            f"The .zip archive cannot be read ({exc}). If it was cut short, upload it again.",
            code="bad_archive",
        ) from exc
    with archive:
        infos = archive.infolist()
        _check_count(len(infos), limits)
        declared = sum(i.file_size for i in infos)
        _check_total(declared, archive_path, limits)
        files: list[str] = []
        written = 0
        for info in infos:
            relative = safe_member_path(info.filename)
            mode = info.external_attr >> 16
            if info.is_dir():
                (target / relative).mkdir(parents=True, exist_ok=True)
                continue
            # Zip tools that record no file type leave those bits 0: a plain file.
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                raise UnsafeArchive(
                    f"The archive entry {info.filename!r} is a link or special file; only "
                    "regular files are accepted."
                )
            if (
                info.file_size > _CHUNK
                and info.compress_size
                and info.file_size / info.compress_size > limits.max_ratio
            ):
                raise _bomb(info.filename, limits)
            try:
                with archive.open(info) as source:
                    written += _copy(source, target / relative, written, archive_path, limits)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise InvalidModel(
                    f"The archive entry {info.filename!r} is damaged ({exc}). Upload it again.",
                    code="bad_archive",
                ) from exc
            files.append(str(relative))
    return tuple(files), written


def _extract_tar(
    archive_path: Path, target: Path, limits: ArchiveLimits
) -> tuple[tuple[str, ...], int]:
    files: list[str] = []
    written = 0
    count = 0
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            for member in _members(archive):
                count += 1
                _check_count(count, limits)
                relative = safe_member_path(member.name)
                if member.isdir():
                    (target / relative).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise UnsafeArchive(
                        f"The archive entry {member.name!r} is a link or special file; only "
                        "regular files are accepted."
                    )
                _check_total(written + member.size, archive_path, limits)
                source = archive.extractfile(member)
                if source is None:
                    raise UnsafeArchive(f"The archive entry {member.name!r} cannot be read.")
                with source:
                    written += _copy(source, target / relative, written, archive_path, limits)
                files.append(str(relative))
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise InvalidModel(
            f"The archive cannot be read ({exc}). Upload a .zip or .tar.gz holding the .onnx "
            "file and its external data files; if it was cut short, upload it again.",
            code="bad_archive",
        ) from exc
    return tuple(files), written


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    # Iterating (not getmembers()) reads one header at a time, so the count cap
    # stops an archive with millions of entries before they are all listed.
    yield from archive


def _copy(
    source: IO[bytes], destination: Path, already: int, archive_path: Path, limits: ArchiveLimits
) -> int:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        raise UnsafeArchive(f"The archive holds {destination.name!r} twice.")
    copied = 0
    with destination.open("xb") as out:
        while chunk := source.read(_CHUNK):
            copied += len(chunk)
            _check_total(already + copied, archive_path, limits)
            out.write(chunk)
    return copied


def _check_count(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_entries:
        raise UnsafeArchive(
            f"The archive has more than {limits.max_entries} entries. Archive only the model "
            "and its external data files."
        )


def _check_total(total: int, archive_path: Path, limits: ArchiveLimits) -> None:
    if total > limits.max_total_bytes:
        raise UnsafeArchive(
            f"The archive unpacks to more than {limits.max_total_bytes // (1024 * 1024)} MB, "
            "over this server's limit (MODELPORT_CONVERSION_MAX_EXTRACT_MB)."
        )
    compressed = max(archive_path.stat().st_size, 1)
    if total > 1024 * 1024 and total / compressed > limits.max_ratio:
        raise _bomb(archive_path.name, limits)


def _bomb(name: str, limits: ArchiveLimits) -> UnsafeArchive:
    return UnsafeArchive(
        f"{name!r} expands more than {limits.max_ratio:.0f} times its compressed size, which is "
        "how decompression bombs look; model weights do not compress like that. Upload the "
        "archive without such padding."
    )


def _the_model(target: Path, files: tuple[str, ...]) -> Path:
    models = [f for f in files if f.lower().endswith(".onnx")]
    if not models:
        raise InvalidModel(
            "The archive holds no .onnx file. Put the model (.onnx) and its external data "
            "files in one folder and archive that.",
            code="no_model_in_archive",
        )
    if len(models) > 1:
        raise InvalidModel(
            f"The archive holds {len(models)} .onnx files ({', '.join(models[:5])}); it must "
            "hold exactly one model with its external data.",
            code="several_models_in_archive",
        )
    return target / models[0]
