"""ONNX archives unpack safely: no escape from the folder, no links, no bombs."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from deployer.convert.archive import (
    ArchiveLimits,
    UnsafeArchive,
    extract_onnx_archive,
    safe_member_path,
)
from deployer.errors import InvalidModel
from tests.deployer.convert import conversion_models as cm
from tests.onnx_models import linear_model


def _no_files_left(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_model_and_external_data_are_extracted_together(tmp_path: Path, kind: str) -> None:
    folder = cm.onnx_with_external_data(tmp_path / "src")[0].parent
    archive = tmp_path / f"model.{kind}"
    if kind == "zip":
        cm.onnx_zip(archive, folder)
    else:
        cm.onnx_tar_gz(archive, folder)
    extracted = extract_onnx_archive(archive, tmp_path / "out")
    assert extracted.model_path.name == "model.onnx"
    assert (extracted.model_path.parent / "weights.bin").is_file()
    assert extracted.model_path.is_relative_to(tmp_path / "out")


@pytest.mark.parametrize(
    "name",
    ["../evil.onnx", "/etc/evil.onnx", "a/../../evil.onnx", "C:\\evil.onnx", "..\\evil.onnx"],
)
def test_entries_that_leave_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeArchive):
        safe_member_path(name)
    archive = tmp_path / "evil.zip"
    cm.zip_with_entries(archive, {name: b"x", "model.onnx": b"y"})
    with pytest.raises(UnsafeArchive):
        extract_onnx_archive(archive, tmp_path / "out")
    assert _no_files_left(tmp_path / "out")
    assert not (tmp_path / "evil.onnx").exists()


def test_links_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    cm.tar_with_symlink(archive, b"onnx")
    with pytest.raises(UnsafeArchive, match="link or special file"):
        extract_onnx_archive(archive, tmp_path / "out")
    assert _no_files_left(tmp_path / "out")


def test_zip_symlink_entries_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        info = zipfile.ZipInfo("weights.bin")
        info.external_attr = (0o120777 << 16) | 0
        handle.writestr(info, "/etc/passwd")
        handle.writestr("model.onnx", b"x")
    with pytest.raises(UnsafeArchive, match="link or special file"):
        extract_onnx_archive(archive, tmp_path / "out")


def test_decompression_bomb_is_stopped(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("model.onnx", b"\0" * (256 * 1024 * 1024))
    assert archive.stat().st_size < 1024 * 1024
    with pytest.raises(UnsafeArchive, match="decompression bombs"):
        extract_onnx_archive(archive, tmp_path / "out")
    assert _no_files_left(tmp_path / "out")


def test_tar_bomb_is_stopped_while_writing(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    data = b"\0" * (64 * 1024 * 1024)
    with tarfile.open(archive, "w:gz") as handle:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        handle.addfile(info, io.BytesIO(data))
    with pytest.raises(UnsafeArchive, match="decompression bombs"):
        extract_onnx_archive(archive, tmp_path / "out")


def test_total_size_and_entry_count_are_capped(tmp_path: Path) -> None:
    many = tmp_path / "many.zip"
    cm.zip_with_entries(many, {f"f{i}.bin": b"x" for i in range(20)} | {"model.onnx": b"m"})
    with pytest.raises(UnsafeArchive, match="more than 10 entries"):
        extract_onnx_archive(many, tmp_path / "a", limits=ArchiveLimits(max_entries=10))
    big = tmp_path / "big.zip"
    cm.zip_with_entries(big, {"model.onnx": bytes(range(256)) * 8192})
    with pytest.raises(UnsafeArchive, match="unpacks to more than"):
        extract_onnx_archive(big, tmp_path / "b", limits=ArchiveLimits(max_total_bytes=1024))


def test_archive_without_exactly_one_model_is_refused(tmp_path: Path) -> None:
    none = tmp_path / "none.zip"
    cm.zip_with_entries(none, {"weights.bin": b"x"})
    with pytest.raises(InvalidModel, match=r"no .onnx file"):
        extract_onnx_archive(none, tmp_path / "a")
    linear_model(tmp_path / "m.onnx")
    two = tmp_path / "two.zip"
    data = (tmp_path / "m.onnx").read_bytes()
    cm.zip_with_entries(two, {"a.onnx": data, "b.onnx": data})
    with pytest.raises(InvalidModel, match=r"2 .onnx files"):
        extract_onnx_archive(two, tmp_path / "b")


def test_damaged_archive_names_the_problem(tmp_path: Path) -> None:
    folder = cm.onnx_with_external_data(tmp_path / "src")[0].parent
    archive = tmp_path / "model.tar.gz"
    cm.onnx_tar_gz(archive, folder)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(InvalidModel, match="cannot be read") as error:
        extract_onnx_archive(cut, tmp_path / "out")
    assert error.value.code == "bad_archive"
    assert _no_files_left(tmp_path / "out")
