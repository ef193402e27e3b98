"""``Idempotency-Key`` for the API's mutating calls.

A retry with the same key and the same request returns the first result; the same
key while the first request is still running gets 409; the same key with another
request gets 422. Only successful results are kept, so a call refused for a
passing reason (409 not ready, say) can be retried with the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar, cast

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from portal.core.api import ApiError, Conflict
from portal.core.models import IdempotencyRecord
from portal.registry.uploads import upload_sha256

HEADER = "Idempotency-Key"
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    HEADER,
    str,
    location=OpenApiParameter.HEADER,
    required=False,
    description="Any unique string (a UUID, say). A retry with the same key and request "
    "returns the first result instead of doing the work again.",
)
# A request that held its key this long without finishing is taken as lost.
ABANDONED_AFTER = timedelta(minutes=30)

F = TypeVar("F", bound=Callable[..., Response])


def fingerprint(request: Request, path: str) -> str:
    """A digest of what the request asks for: method, path and body (files by content)."""
    body: dict[str, Any] = {}
    data = request.data
    if hasattr(data, "lists"):
        items = data.lists()
    elif isinstance(data, dict):
        items = data.items()
    else:  # a JSON array or scalar: the serializer will refuse it, but the digest is still exact
        items = [("", data)]
    for name, value in items:
        values = value if isinstance(value, list) else [value]
        body[str(name)] = [_plain(v) for v in values]
    for name, files in request.FILES.lists():
        body[f"file:{name}"] = [upload_sha256(f) for f in files]
    text = json.dumps([request.method, path, body], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, UploadedFile):
        return upload_sha256(value)
    return value


def idempotent(method: F) -> F:
    """Make an APIView method honour ``Idempotency-Key``."""

    @wraps(method)
    def wrapper(view: Any, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = request.headers.get(HEADER)
        if key is None:
            return method(view, request, *args, **kwargs)
        if not key.strip() or len(key) > 255 or not key.isprintable():
            raise ApiError(
                f"{HEADER} must be 1-255 printable characters.", code="invalid_idempotency_key"
            )
        path = request.path
        digest = fingerprint(request, path)
        record = _claim(request, key, path, digest)
        if isinstance(record, Response):
            return record
        try:
            response = method(view, request, *args, **kwargs)
        except BaseException:
            record.delete()
            raise
        if status.is_success(response.status_code):
            record.state = IdempotencyRecord.State.DONE
            record.response_status = response.status_code
            record.response_body = json.loads(json.dumps(response.data, default=str))
            record.completed_at = timezone.now()
            record.save(update_fields=["state", "response_status", "response_body", "completed_at"])
        else:
            record.delete()
        return response

    return cast(F, wrapper)


def _user_id(request: Request) -> int:
    return int(request.user.pk or 0)


def _claim(request: Request, key: str, path: str, digest: str) -> IdempotencyRecord | Response:
    for _ in range(2):
        try:
            # A savepoint, so a clash leaves any outer transaction usable.
            with transaction.atomic():
                return IdempotencyRecord.objects.create(
                    user_id=_user_id(request),
                    key=key,
                    method=request.method or "",
                    path=path,
                    fingerprint=digest,
                )
        except IntegrityError:
            pass
        existing = IdempotencyRecord.objects.filter(user_id=_user_id(request), key=key).first()
        if existing is None:
            continue  # the holder failed and released the key in between
        if existing.fingerprint != digest:
            raise ApiError(
                f"This {HEADER} was used for a different request ({existing.method} "
                f"{existing.path}). Use a new key for a new request.",
                code="idempotency_key_reused",
                status_code=status.HTTP_422_UNPROCESSABLE_ENTITY,
            )
        if existing.state == IdempotencyRecord.State.DONE:
            return Response(
                existing.response_body,
                status=existing.response_status or status.HTTP_200_OK,
                headers={"Idempotent-Replayed": "true"},
            )
        if timezone.now() - existing.created_at > ABANDONED_AFTER:
            existing.delete()
            continue
        raise Conflict(
            f"A request with this {HEADER} is still being processed; retry when it finishes.",
            code="idempotency_in_progress",
        )
    raise Conflict(f"Could not claim the {HEADER}; retry.", code="idempotency_in_progress")


def idempotency_records_expire() -> int:
    """Forget results older than MODELPORT_IDEMPOTENCY_HOURS."""
    cutoff = timezone.now() - timedelta(hours=settings.MODELPORT_IDEMPOTENCY_HOURS)
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted
