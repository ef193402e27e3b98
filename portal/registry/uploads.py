"""Uploads stream to a temporary file on the storage volume while they are hashed.

Nothing is held in memory: each chunk is written and fed to SHA-256 as it
arrives, and the size limit is enforced on the bytes received, so a client that
lies about Content-Length cannot exceed it either.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from rest_framework import exceptions, status

# Multipart framing and the other form fields add a little to the file itself.
_FORM_OVERHEAD = 1024 * 1024


class UploadTooLarge(exceptions.APIException):
    """The upload is over MODELPORT_MAX_UPLOAD_MB."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "upload_too_large"

    def __init__(self) -> None:
        limit_mb = settings.MODELPORT_MAX_UPLOAD_BYTES // (1024 * 1024)
        super().__init__(
            f"The upload is larger than this server's limit of {limit_mb} MB "
            "(MODELPORT_MAX_UPLOAD_MB).",
            code=self.default_code,
        )


class HashingUploadHandler(TemporaryFileUploadHandler):
    """Django upload handler that hashes and size-checks while writing to disk."""

    def handle_raw_input(
        self,
        input_data: Any,
        META: dict[str, Any],
        content_length: int,
        boundary: str,
        encoding: str | None = None,
    ) -> None:
        if content_length and content_length > settings.MODELPORT_MAX_UPLOAD_BYTES + _FORM_OVERHEAD:
            raise UploadTooLarge()

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self.hasher = hashlib.sha256()
        self.received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self.received += len(raw_data)
        if self.received > settings.MODELPORT_MAX_UPLOAD_BYTES:
            self.file.close()
            raise UploadTooLarge()
        self.hasher.update(raw_data)
        self.file.write(raw_data)

    def file_complete(self, file_size: int) -> UploadedFile | None:
        uploaded = super().file_complete(file_size)
        if uploaded is not None:
            uploaded.sha256 = self.hasher.hexdigest()  # type: ignore[attr-defined]
        return uploaded


def upload_sha256(uploaded: UploadedFile) -> str:
    """The SHA-256 computed while the file streamed in (computed now for other files)."""
    known = getattr(uploaded, "sha256", None)
    if known:
        return str(known)
    hasher = hashlib.sha256()
    for chunk in uploaded.chunks():
        hasher.update(chunk)
    uploaded.seek(0)
    return hasher.hexdigest()
