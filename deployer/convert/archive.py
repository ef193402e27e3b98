"""Extract an uploaded .zip or .tar.gz safely; stream the tars going into and out of a sandbox.

Every entry is checked before a byte is written: relative paths only, no ``..``,
regular files and folders only (no links, devices or FIFOs), and caps on the
number of entries, the total size and the compression ratio. Sizes are counted
on the bytes actually written, so an archive that lies in its headers is stopped
too. ONNX's own rule, that external data stays in the model's folder, is checked
again when the model is validated.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from deployer.errors import DeployerError, InvalidModel, LimitExceeded

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
    files, total = extract_archive(archive_path, target, limits=limits)
    try:
        return ExtractedModel(model_path=_the_model(target, files), files=files, total_bytes=total)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def extract_archive(
    archive_path: Path, target: Path, *, limits: ArchiveLimits = ArchiveLimits()
) -> tuple[tuple[str, ...], int]:
    """Unpack a .zip or .tar(.gz) into ``target`` (created, removed again on failure);
    return the files' relative paths and the bytes written."""
    target.mkdir(parents=True, exist_ok=False)
    try:
        with archive_path.open("rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK"):
            return _extract_zip(archive_path, target, limits)
        return _extract_tar(archive_path, target, limits)
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
            "over this server's limit (MODELPORT_ARCHIVE_MAX_MB)."
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


# ---------------------------------------------------------------- sandbox transfers
#
# The files going into a conversion container and the ones coming out travel as tar
# streams. Both directions are streamed piece by piece, so a multi-GB upload costs the
# process that holds the Docker socket a few MB, and what comes out is capped.


@dataclass(frozen=True)
class TarEntry:
    """One entry of a tar stream: a folder, a file on disk, or a few bytes."""

    name: str
    source: Path | bytes | None = None  # None: a folder


class OutputTooLarge(LimitExceeded):
    """A sandbox tried to hand back more than its output allowance."""

    code = "output_too_large"


def tar_stream(entries: Sequence[TarEntry], *, uid: int = 0) -> Iterator[bytes]:
    """The tar archive of ``entries`` as chunks of at most 1 MiB, owned by ``uid``."""
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.uid = info.gid = uid
        info.mtime = int(time.time())
        if entry.source is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield info.tobuf(tarfile.PAX_FORMAT)
            continue
        info.mode = 0o644
        if isinstance(entry.source, bytes):
            info.size = len(entry.source)
            yield info.tobuf(tarfile.PAX_FORMAT)
            yield entry.source
        else:
            with entry.source.open("rb") as handle:
                info.size = os.fstat(handle.fileno()).st_size
                yield info.tobuf(tarfile.PAX_FORMAT)
                left = info.size
                while left:
                    chunk = handle.read(min(_CHUNK, left))
                    if not chunk:
                        raise DeployerError(
                            f"{entry.name} shrank while it was being sent to the sandbox.",
                            code="sandbox_failed",
                        )
                    left -= len(chunk)
                    yield chunk
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)


class _CappedStream(io.RawIOBase):
    """A readable file over an iterator of chunks that stops past ``cap`` bytes."""

    def __init__(self, chunks: Iterable[bytes], cap: int, error: Callable[[], Exception]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""
        self._cap = cap
        self._error = error
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
            self.read_bytes += len(self._pending)
            if self.read_bytes > self._cap:
                raise self._error()
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def extract_flat_folder(
    chunks: Iterable[bytes],
    out_dir: Path,
    *,
    folder: str,
    max_bytes: int,
    max_files: int,
    name_pattern: re.Pattern[str],
) -> list[str]:
    """Take only plain files directly under ``folder/`` from a streamed tar, up to the caps.

    Raises ``OutputTooLarge`` when the files (or the stream) pass ``max_bytes``.
    """

    def too_large() -> OutputTooLarge:
        return OutputTooLarge(
            f"The sandbox tried to hand back more than {max_bytes // (1024 * 1024)} MB "
            "(MODELPORT_CONVERSION_DISK_MB); the conversion was stopped and nothing of it kept.",
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    # Headers and padding come on top of the files' own bytes.
    stream = _CappedStream(chunks, max_bytes + (max_files + 16) * 4 * tarfile.BLOCKSIZE, too_large)
    taken: list[str] = []
    written = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, _CHUNK), mode="r|") as archive:
            for member in archive:
                parts = PurePosixPath(member.name).parts
                if len(parts) != 2 or parts[0] != folder or not member.isreg():
                    continue
                if not name_pattern.match(parts[1]):
                    continue
                if len(taken) >= max_files:
                    raise DeployerError("The sandbox wrote too many files.", code="sandbox_failed")
                if written + member.size > max_bytes:
                    raise too_large()
                source = archive.extractfile(member)
                if source is None:
                    continue
                taken.append(parts[1])
                with source, (out_dir / parts[1]).open("wb") as target:
                    shutil.copyfileobj(source, target, _CHUNK)
                written += member.size
    except BaseException as exc:
        for name in taken:
            (out_dir / name).unlink(missing_ok=True)
        if isinstance(exc, tarfile.TarError):
            raise DeployerError(
                f"The sandbox's output could not be read ({exc}).", code="sandbox_failed"
            ) from exc
        raise
    return taken
