"""Errors the serving runtime turns into protocol error responses."""

from __future__ import annotations


class ServingError(Exception):
    """An error with the HTTP status it maps to; the message goes back to the caller."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    """The request is malformed or does not match the model (HTTP 400)."""

    status = 400


class NotFound(ServingError):
    """Unknown model, version or path (HTTP 404)."""

    status = 404


class PayloadTooLarge(ServingError):
    """The request body is over the configured limit (HTTP 413)."""

    status = 413


class Unavailable(ServingError):
    """The model is not ready, or the server is draining (HTTP 503)."""

    status = 503


class Unauthorized(ServingError):
    """No key, an unknown key or an expired key (HTTP 401, gRPC UNAUTHENTICATED)."""

    status = 401


class RateLimited(ServingError):
    """The key's token bucket is empty (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ServingError):
    """The batch queue is full (HTTP 503 with Retry-After, gRPC RESOURCE_EXHAUSTED)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
