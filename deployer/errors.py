"""Errors the engine raises, each with a stable code and a message a user can act on."""

from __future__ import annotations


class DeployerError(Exception):
    """A failure with a stable ``code`` and a ``message`` that says what to do."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidModel(DeployerError):
    """The uploaded file is not a model we can serve."""

    code = "invalid_model"


class InvalidSample(DeployerError):
    """The sample input does not fit the model's signature."""

    code = "invalid_sample"


class LimitExceeded(DeployerError):
    """A child process ran out of its memory or time allowance."""

    code = "limit_exceeded"


class TrackingError(DeployerError):
    """MLflow could not record a version."""

    code = "tracking_failed"


class LaunchError(DeployerError):
    """A serving process or container did not start or did not answer correctly."""

    code = "launch_failed"
