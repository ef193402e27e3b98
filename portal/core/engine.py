"""The portal's adapters to the engine in ``deployer``: built from settings, nothing else."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from deployer.checks import Tolerance
from deployer.runtimes.base import Runtime
from deployer.runtimes.local import LocalProcessRuntime
from deployer.sandbox import Limits
from deployer.tracking import TrackingTarget


def runtime() -> Runtime:
    """The runtime that runs serving instances on this installation."""
    return LocalProcessRuntime(
        Path(settings.DATA_DIR) / "runtime" / "local", host=settings.MODELPORT_SERVING_HOST
    )


def tracking_target() -> TrackingTarget:
    return TrackingTarget(
        tracking_uri=settings.MLFLOW_TRACKING_URI,
        experiment=settings.MLFLOW_EXPERIMENT,
        artifact_root=settings.MLFLOW_ARTIFACT_ROOT,
    )


def validation_limits() -> Limits:
    return Limits(
        memory_mb=settings.MODELPORT_VALIDATION_MEMORY_MB,
        timeout_s=float(settings.MODELPORT_VALIDATION_TIMEOUT_S),
    )


def known_answer_tolerance(device: str) -> Tolerance:
    # GPU kernels sum in another order than the CPU run that recorded the answer.
    return Tolerance(rtol=1e-2, atol=1e-3) if device == "gpu" else Tolerance()
