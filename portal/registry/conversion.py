"""The version pipeline's first half: one call to the engine's conversion operation.

``deployer.convert.pipeline.convert`` detects, converts (or extracts and validates),
checks and optimizes; this module gives it the version's file, options and limits,
chooses where untrusted code may run from the settings, and records what the engine
reports: the step and progress on the row, entries on the timeline.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from django.conf import settings

from deployer.convert.archive import ArchiveLimits
from deployer.convert.formats import (
    CODE_EXECUTING,
    CONTAINER_ONLY,
    CONVERTED_FORMATS,
    Detection,
    Format,
)
from deployer.convert.pipeline import (
    CheckFailed,
    ConversionEvent,
    PipelineRequest,
    convert,
)
from deployer.convert.report import (
    ConversionOptions,
    ConversionReport,
    parse_tolerances,
)
from deployer.convert.runner import ContainerLimits, ContainerSandbox
from deployer.errors import DeployerError
from deployer.sandbox import Limits
from portal.core import engine
from portal.core.choices import EventLevel
from portal.core.services import StepTimer, event_record
from portal.registry.choices import VersionStatus
from portal.registry.models import ModelVersion

log = logging.getLogger(__name__)

# The version's progress (percent) when the engine starts and when it is done; register
# and build follow at 70 and 80.
FIRST_PROGRESS = 8
PREPARED_PROGRESS = 65
__all__ = ["CheckFailed", "NeedsEngineWorker", "version_prepare"]


class NeedsEngineWorker(Exception):
    """This step runs in a container: only a convert-queue worker may start one."""


# ---------------------------------------------------------------- options and settings


def options_from_upload(data: dict[str, Any]) -> dict[str, Any]:
    """The uploader's options as stored on the version: checked, empty values left out.

    Raises ``InvalidOptions`` for values the engine cannot use.
    """
    stored = {k: v for k, v in data.items() if v not in (None, "")}
    ConversionOptions.from_dict(stored)
    return stored


def conversion_options(version: ModelVersion) -> ConversionOptions:
    """The version's options with this server's default tolerances."""
    options = ConversionOptions.from_dict(version.options or {})
    return replace(options, tolerances=parse_tolerances(settings.MODELPORT_CONVERSION_TOLERANCES))


def conversion_limits() -> Limits:
    return Limits(
        memory_mb=settings.MODELPORT_CONVERSION_MEMORY_MB,
        timeout_s=float(settings.MODELPORT_CONVERSION_TIMEOUT_S),
    )


def accepted_formats(*, docker: bool) -> dict[str, str]:
    """Which formats this server converts, and how (for pages: 'container', 'local', 'refused')."""
    trusted = settings.MODELPORT_CONVERSION_TRUSTED_LOCAL
    use_docker = docker and settings.MODELPORT_CONVERSION_SANDBOX != "local"
    accepted = {}
    for fmt in Format:
        if fmt in CONVERTED_FORMATS and use_docker:
            accepted[fmt.value] = "container"
        elif fmt in CONTAINER_ONLY:
            accepted[fmt.value] = "refused"
        elif fmt not in CODE_EXECUTING or trusted:
            accepted[fmt.value] = "local"
        else:
            accepted[fmt.value] = "refused"
    return accepted


def _container_factory(version: ModelVersion, *, engine_access: bool) -> Any:
    """A builder of the container sandbox, or None when no Docker engine answers here.

    Only the worker that deploys talks to the Docker engine; elsewhere this raises
    ``NeedsEngineWorker`` so the pipeline hands the version over to that worker.
    """
    mode = settings.MODELPORT_CONVERSION_SANDBOX
    if mode == "local":
        return None
    if not engine_access:
        raise NeedsEngineWorker
    from deployer.images.build import engine_available

    if not engine_available():
        if mode == "docker":
            raise DeployerError(
                "Conversion is set to run in containers (MODELPORT_CONVERSION_SANDBOX=docker), "
                "but no Docker engine answers this worker. Start it, or check DOCKER_HOST.",
                code="docker_unavailable",
            )
        return None

    def build(family: str = "core") -> ContainerSandbox:
        from deployer.convert.image import converter_image_ensure
        from deployer.images.build import docker_client

        client = docker_client(timeout_s=600)
        timer = StepTimer()
        image = converter_image_ensure(
            engine.image_config(), family=family, log=_ImageLog(version), client=client
        )
        if timer.ms > 2000:
            event_record(
                team=version.model.team,
                version=version,
                step="convert",
                message=f"Converter image {image.ref} ready "
                f"({image.image.size_bytes / 1e6:.0f} MB, built once per converter version)",
                duration_ms=timer.ms,
            )
        return ContainerSandbox(
            client,
            image.ref,
            ContainerLimits(
                memory_mb=settings.MODELPORT_CONVERSION_MEMORY_MB,
                cpus=settings.MODELPORT_CONVERSION_CPUS,
                pids=settings.MODELPORT_CONVERSION_PIDS_LIMIT,
                timeout_s=float(settings.MODELPORT_CONVERSION_TIMEOUT_S),
                tmpfs_mb=settings.MODELPORT_CONVERSION_TMPFS_MB,
                disk_mb=settings.MODELPORT_CONVERSION_DISK_MB,
                log_mb=settings.MODELPORT_CONVERSION_LOG_MB,
            ),
            labels={
                "modelport.installation": settings.MODELPORT_INSTALLATION_ID,
                "modelport.version-uid": str(version.uid),
            },
        )

    return build


class _ImageLog:
    """Milestones of a converter image build go to the timeline (and keep the row fresh)."""

    def __init__(self, version: ModelVersion) -> None:
        self.version = version

    def __call__(self, line: str) -> None:
        if line.startswith(("Building the converter image", "Downloading wheels", "Built ")):
            event_record(
                team=self.version.model.team, version=self.version, step="convert", message=line
            )
        ModelVersion.objects.filter(pk=self.version.pk).update(progress=self.version.progress)


# ---------------------------------------------------------------- the operation


def version_prepare(version: ModelVersion, *, engine_access: bool = False) -> None:
    """Produce the version's served ONNX model, its signature and known answer.

    One call to the engine (``deployer.convert.pipeline.convert``); this records what it
    reports. Raises ``NeedsEngineWorker`` when the conversion must run in a container and
    this process may not talk to Docker (``engine_access``).
    """
    options = conversion_options(version)
    earlier = (version.report or {}).get("detection")
    request = PipelineRequest(
        upload=version.upload_path,
        file_name=version.file_name,
        storage_dir=version.storage_dir,
        known_answer_path=version.known_answer_path,
        stated_format="" if earlier else version.source_format,
        sample_path=version.sample_path,
        options=options,
        limits=conversion_limits(),
        validation_limits=engine.validation_limits(),
        archive_limits=ArchiveLimits(
            max_entries=settings.MODELPORT_ARCHIVE_MAX_ENTRIES,
            max_total_bytes=settings.MODELPORT_ARCHIVE_MAX_MB * 1024 * 1024,
        ),
        trusted_local=settings.MODELPORT_CONVERSION_TRUSTED_LOCAL,
        container=lambda: _container_factory(version, engine_access=engine_access),
        detection=Detection(Format(earlier["format"]), earlier["evidence"]) if earlier else None,
    )
    try:
        result = convert(request, _Recorder(version))
    except CheckFailed as exc:
        version.report = {**version.report, "conversion": exc.report.to_dict()}
        version.save(update_fields=["report", "updated_at"])
        raise
    report: dict[str, Any] = {"validation": result.validation}
    if result.conversion is not None:
        report["conversion"] = result.conversion.to_dict()
    if "detection" in version.report:
        report["detection"] = version.report["detection"]
    version.report = report
    version.signature = result.signature
    version.served_file = str(result.served_path.relative_to(version.storage_dir))
    version.progress = max(version.progress, PREPARED_PROGRESS)
    version.save(update_fields=["signature", "report", "served_file", "progress", "updated_at"])


class _Recorder:
    """The engine's events as the version's step, progress and timeline entries."""

    def __init__(self, version: ModelVersion) -> None:
        self.version = version

    def __call__(self, event: ConversionEvent) -> None:
        version = self.version
        if event.kind == "start":
            status = (
                VersionStatus.CONVERTING
                if event.phase == "converting"
                else VersionStatus.VALIDATING
            )
            version.advance(status=status, step=event.step, progress=_percent(version, event))
            return
        actor = version.created_by if event.data.get("override_reason") else None
        event_record(
            team=version.model.team,
            actor=actor,
            version=version,
            step=event.step,
            level=_LEVELS[event.level],
            message=event.message,
            duration_ms=None if event.duration_ms is None else int(event.duration_ms),
            data=event.data,
        )
        if event.step == "detect" and event.kind == "done":
            # Kept so a worker the version is handed to starts after detection.
            version.source_format = event.data["format"]
            version.report = {
                **(version.report or {}),
                "detection": {"format": event.data["format"], "evidence": event.data["evidence"]},
            }
            version.save(update_fields=["source_format", "report", "updated_at"])


_LEVELS = {"info": EventLevel.INFO, "warning": EventLevel.WARNING, "error": EventLevel.ERROR}


def _percent(version: ModelVersion, event: ConversionEvent) -> int:
    """The version's progress for an engine event; it never goes down."""
    span = PREPARED_PROGRESS - FIRST_PROGRESS
    return max(version.progress, FIRST_PROGRESS + int(event.progress * span))


# ---------------------------------------------------------------- MLflow


def mlflow_extras(
    version: ModelVersion,
) -> tuple[dict[str, str], dict[str, float], tuple[Path, ...]]:
    """Parameters, metrics and artifacts of the conversion for the version's MLflow run."""
    data = version.report.get("conversion")
    if not data:
        return {}, {}, ()
    report = ConversionReport.from_dict(data)
    artifacts: tuple[Path, ...] = ()
    served = version.served_model_path
    if served is not None and served != version.upload_path and version.upload_path.is_file():
        artifacts = (version.upload_path,)
    params = {
        f"conversion_{k}" if k == "source_format" else k: v for k, v in report.params().items()
    }
    return params, report.metrics(), artifacts
