"""An archive refused for its size names the setting that raises the limit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings

from deployer.convert.archive import ArchiveLimits, UnsafeArchive, extract_onnx_archive
from tests.deployer.convert import conversion_models as cm


def test_archive_too_large_names_a_setting_that_exists(tmp_path: Path) -> None:
    big = tmp_path / "big.zip"
    cm.zip_with_entries(big, {"model.onnx": bytes(range(256)) * 8192})
    with pytest.raises(UnsafeArchive) as raised:
        extract_onnx_archive(big, tmp_path / "out", limits=ArchiveLimits(max_total_bytes=1024))
    named = re.findall(r"MODELPORT_[A-Z0-9_]+", raised.value.message)
    assert named == ["MODELPORT_ARCHIVE_MAX_MB"], raised.value.message
    assert all(hasattr(settings, name) for name in named)
