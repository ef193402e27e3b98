"""The keys file the portal writes for the serving runtime (deployer.keys)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from deployer.keys import (
    KeyEntry,
    KeySet,
    KeysFileError,
    key_sha256,
    read_keys_file,
    write_keys_file,
)


def test_keys_file_has_the_agreed_format(tmp_path: Path) -> None:
    path = tmp_path / "d1" / "keys.json"
    keys = KeySet(
        public=False,
        keys=(KeyEntry(id="k_1", sha256=key_sha256("mpk_x"), expires_at=1767225600,
                       rate_per_s=2.5, burst=5),),
    )  # fmt: skip
    assert write_keys_file(path, keys) is True
    data = json.loads(path.read_text())
    assert data == {
        "version": 1,
        "public": False,
        "keys": [
            {"id": "k_1", "sha256": key_sha256("mpk_x"), "expires_at": 1767225600,
             "rate_per_s": 2.5, "burst": 5}
        ],
    }  # fmt: skip
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert read_keys_file(path) == keys


def test_unchanged_content_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert write_keys_file(path, KeySet())
    inode = path.stat().st_ino
    assert write_keys_file(path, KeySet()) is False
    assert path.stat().st_ino == inode
    assert write_keys_file(path, KeySet(public=True)) is True
    assert path.stat().st_ino != inode  # replaced by a rename, never written in place


def test_a_reader_never_sees_half_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    big = tuple(KeyEntry(id=f"k_{i}", sha256=key_sha256(str(i))) for i in range(2000))
    write_keys_file(path, KeySet(keys=big[:1]))
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                read_keys_file(path)
            except KeysFileError as exc:
                bad.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(40):
        write_keys_file(path, KeySet(keys=big[: 1 + (n % 2) * 1999]))
    stop.set()
    thread.join()
    assert bad == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": "", "sha256": "0" * 64}, "id"),
        ({"id": "k", "sha256": "XYZ"}, "sha256"),
        ({"id": "k", "sha256": "0" * 64, "rate_per_s": 0}, "rate_per_s"),
        ({"id": "k", "sha256": "0" * 64, "rate_per_s": 1, "burst": 0}, "burst"),
    ],
)
def test_bad_entries_are_named(entry: dict[str, object], problem: str) -> None:
    with pytest.raises(KeysFileError, match=problem):
        KeySet.from_json({"version": 1, "public": False, "keys": [entry]})


def test_wrong_version_is_refused() -> None:
    with pytest.raises(KeysFileError, match="version 1"):
        KeySet.from_json({"version": 2, "keys": []})
