"""Uploads: an upload cut off midway leaves no file and no row."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas


def _incoming() -> list[Path]:
    return [p for p in Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir() if p.is_file()]


@pytest.mark.django_db(transaction=True)
def test_aborted_upload_leaves_no_file_and_no_row(personas: Personas, live_server: Any) -> None:
    Model.objects.create(team=personas.acme, name="demo")
    before = set(_incoming())
    url = urlsplit(live_server.url)
    boundary = "xyzBOUNDARYxyz"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    announced = 50 * 1024 * 1024
    request = (
        f"POST /api/v1/models/demo/versions/ HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\n"
        f"Authorization: Token {personas.bob.token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {announced}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(request + head)
        chunk = b"\0" * (256 * 1024)
        for _ in range(16):  # 4 MB of the announced 50 MB, then the client goes away
            sock.sendall(chunk)
        # While the body streams in, what has arrived sits in one temporary file.
        deadline = time.monotonic() + 10
        while not set(_incoming()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        partial = set(_incoming()) - before
        assert len(partial) == 1, "the upload should be streaming into a temporary file"
        assert next(iter(partial)).stat().st_size > 0
    deadline = time.monotonic() + 15
    while set(_incoming()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(_incoming()) - before == set(), "the partial upload was left on disk"
    assert ModelVersion.objects.count() == 0
    versions_dir = Path(settings.MODELPORT_STORAGE_DIR) / "versions"
    assert not versions_dir.exists() or not any(versions_dir.rglob("big.onnx"))
