"""The version pipeline's first half: detect, then convert (or validate), check, optimize.

Each step moves the version's progress and adds a timeline entry with its duration.
What runs untrusted code runs in a sandbox chosen here from the settings (see
``deployer.convert.runner``); this module only moves files and rows.

    detect -> [archive: extract] -> validate -> optimize            (ONNX uploads)
    detect -> load -> convert -> check -> optimize [-> quantize] -> validate   (others)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from django.conf import settings

from deployer.convert.archive import ArchiveLimits, extract_onnx_archive
from deployer.convert.formats import CODE_EXECUTING, CONVERTED_FORMATS, LABELS, Format, resolve
from deployer.convert.onnx_tools import newest_runtime_opset
from deployer.convert.report import (
    ConversionOptions,
    ConversionReport,
    parse_tolerances,
)
from deployer.convert.runner import (
    ContainerLimits,
    ContainerSandbox,
    ConversionRequest,
    Sandbox,
    StepEvent,
    choose_sandbox,
    convert_model,
)
from deployer.errors import DeployerError
from deployer.sandbox import Limits
from deployer.validate import ValidationReport, ValidationRequest, validate_onnx
from portal.core import engine
from portal.core.choices import EventLevel
from portal.core.services import StepTimer, event_record
from portal.registry.choices import VersionStatus
from portal.registry.models import ModelVersion

log = logging.getLogger(__name__)

# Progress (percent) when each step starts; register and build follow at 70 and 80.
PROGRESS = {
    "detect": 8,
    "extract": 12,
    "load": 15,
    "convert": 25,
    "check": 35,
    "optimize": 45,
    "quantize": 50,
    "validate": 55,
}
CONVERTED_DIR = "converted"
EXTRACTED_DIR = "extracted"


class NeedsEngineWorker(Exception):
    """This conversion runs in a container: only the deploy worker may start one."""


class CheckFailed(DeployerError):
    """The converted model does not compute what the original does."""

    code = "check_failed"


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

    def build() -> Sandbox:
        from deployer.convert.image import converter_image_ensure
        from deployer.images.build import docker_client

        client = docker_client(timeout_s=600)
        timer = StepTimer()
        image = converter_image_ensure(engine.image_config(), log=_ImageLog(version), client=client)
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


# ---------------------------------------------------------------- the steps


def version_prepare(version: ModelVersion, *, engine_access: bool = False) -> None:
    """Produce the version's served ONNX model, its signature and known answer.

    Raises ``NeedsEngineWorker`` when the conversion must run in a container and this
    process may not talk to Docker (``engine_access``).
    """
    options = conversion_options(version)
    fmt, evidence = _detect(version)
    if fmt in CONVERTED_FORMATS:
        report = _convert(version, fmt, options, evidence, engine_access=engine_access)
        served = version.storage_dir / CONVERTED_DIR / "model.onnx"
        validation = _validate(version, served)
        version.report = {"validation": validation.details, "conversion": report.to_dict()}
    else:
        model_path = version.upload_path
        if fmt == Format.ONNX_ARCHIVE:
            model_path = _extract(version)
        validation = _validate(version, model_path)
        version.report = {"validation": validation.details}
        served = model_path
        if options.optimize or options.quantize:
            served, report = _optimize_onnx(version, fmt, model_path, options)
            version.report["conversion"] = report.to_dict()
    version.signature = validation.signature.to_dict()
    version.served_file = str(served.relative_to(version.storage_dir))
    version.progress = 65
    version.save(update_fields=["signature", "report", "served_file", "progress", "updated_at"])


def _detect(version: ModelVersion) -> tuple[Format, str]:
    version.advance(status=VersionStatus.VALIDATING, step="detect", progress=PROGRESS["detect"])
    timer = StepTimer()
    stated = version.source_format
    detection = resolve(version.upload_path, stated=stated, file_name=version.file_name)
    assert detection.format is not None
    fmt = detection.format
    version.source_format = fmt.value
    version.save(update_fields=["source_format", "updated_at"])
    event_record(
        team=version.model.team,
        version=version,
        step="detect",
        message=f"{LABELS[fmt]}: {detection.evidence}"
        + (f" (stated: {stated})" if stated and stated != fmt.value else ""),
        duration_ms=timer.ms,
        data={"format": fmt.value, "evidence": detection.evidence},
    )
    return fmt, detection.evidence


def _extract(version: ModelVersion) -> Path:
    version.advance(status=VersionStatus.VALIDATING, step="extract", progress=PROGRESS["extract"])
    timer = StepTimer()
    target = version.storage_dir / EXTRACTED_DIR
    shutil.rmtree(target, ignore_errors=True)
    extracted = extract_onnx_archive(
        version.upload_path,
        target,
        limits=ArchiveLimits(
            max_entries=settings.MODELPORT_ARCHIVE_MAX_ENTRIES,
            max_total_bytes=settings.MODELPORT_ARCHIVE_MAX_MB * 1024 * 1024,
        ),
    )
    event_record(
        team=version.model.team,
        version=version,
        step="extract",
        message=f"Extracted {len(extracted.files)} file(s), {extracted.total_bytes / 1e6:.1f} MB; "
        f"model {extracted.model_path.relative_to(target)}",
        duration_ms=timer.ms,
        data={"files": list(extracted.files)[:50]},
    )
    return extracted.model_path


def _request(
    version: ModelVersion,
    fmt: Format,
    source: Path,
    options: ConversionOptions,
    work: Path,
    *,
    known_answer: Path | None = None,
    detected: str = "",
) -> ConversionRequest:
    return ConversionRequest(
        source=source,
        format=fmt,
        out_dir=work / "out",
        work_dir=work / "job",
        options=options,
        sample_path=version.sample_path,
        known_answer=known_answer,
        detected=detected,
        serving_opset=newest_runtime_opset(),
        limits=conversion_limits(),
    )


def _relay(version: ModelVersion) -> Any:
    """Turns the sandbox's step events into progress and timeline entries."""

    def on_step(event: StepEvent) -> None:
        following = {
            "load": "convert",
            "convert": "check",
            "check": "optimize",
            "optimize": "quantize",
        }.get(event.step, "validate")
        level = EventLevel.INFO
        if event.step == "check" and not event.data.get("passed", True):
            level = EventLevel.WARNING if event.data.get("override") else EventLevel.ERROR
        event_record(
            team=version.model.team,
            version=version,
            step=event.step,
            level=level,
            message=event.message,
            duration_ms=int(event.duration_ms),
            data=event.data,
        )
        version.advance(
            status=VersionStatus.CONVERTING,
            step=following,
            progress=PROGRESS.get(following, PROGRESS["validate"]),
        )

    return on_step


def _convert(
    version: ModelVersion,
    fmt: Format,
    options: ConversionOptions,
    evidence: str,
    *,
    engine_access: bool,
) -> ConversionReport:
    container = _container_factory(version, engine_access=engine_access)
    version.advance(status=VersionStatus.CONVERTING, step="load", progress=PROGRESS["load"])
    work = version.storage_dir / "work"
    target = version.storage_dir / CONVERTED_DIR
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        sandbox = choose_sandbox(
            fmt,
            container=container,
            limits=conversion_limits(),
            trusted_local=settings.MODELPORT_CONVERSION_TRUSTED_LOCAL,
        )
        request = _request(
            version,
            fmt,
            version.upload_path,
            options,
            work,
            detected=evidence,
        )
        outcome = convert_model(request, sandbox, on_step=_relay(version))
        target.mkdir(parents=True)
        for produced in request.out_dir.iterdir():
            if produced.name.startswith("model.onnx"):
                shutil.move(produced, target / produced.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = outcome.report
    if not report.passed:
        _check_failed(version, report, options)
    return report


def _check_failed(
    version: ModelVersion, report: ConversionReport, options: ConversionOptions
) -> None:
    failures = "; ".join(o.summary() for o in report.check.failures()) if report.check else ""
    if options.override_reason:
        actor = version.created_by
        event_record(
            team=version.model.team,
            actor=actor,
            version=version,
            step="check",
            level=EventLevel.WARNING,
            message=f"The check failed ({failures}) and was overridden by "
            f"{actor.username if actor else 'the uploader'}: {options.override_reason}",
            data={"override_reason": options.override_reason},
        )
        return
    version.report = {**version.report, "conversion": report.to_dict()}
    version.save(update_fields=["report", "updated_at"])
    version.advance(status=VersionStatus.CONVERTING, step="check", progress=PROGRESS["check"])
    raise CheckFailed(
        f"The converted model does not compute what the original does: {failures}. The "
        "report shows every output. If these differences are acceptable, upload again with a "
        "larger tolerance (atol/rtol) or with an override reason; otherwise the model uses "
        "something that does not convert faithfully (randomness, another opset may help)."
    )


def _validate(version: ModelVersion, model_path: Path) -> ValidationReport:
    version.advance(status=VersionStatus.VALIDATING, step="validate", progress=PROGRESS["validate"])
    timer = StepTimer()
    work_dir = version.storage_dir / "work"
    try:
        report = validate_onnx(
            ValidationRequest(
                model_path=model_path,
                work_dir=work_dir,
                sample_path=version.sample_path,
                limits=engine.validation_limits(),
            )
        )
        shutil.move(report.known_answer_path, version.known_answer_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    inputs = ", ".join(_tensor_text(t) for t in report.signature.to_dict()["inputs"])
    event_record(
        team=version.model.team,
        version=version,
        step="validate",
        message=f"Valid ONNX model; inputs {inputs}; known answer recorded",
        duration_ms=timer.ms,
        data={"timings": report.details.get("timings", {})},
    )
    return report


def _optimize_onnx(
    version: ModelVersion, fmt: Format, model_path: Path, options: ConversionOptions
) -> tuple[Path, ConversionReport]:
    """onnxruntime's optimized form of an ONNX upload, served when it passes the check."""
    version.advance(status=VersionStatus.CONVERTING, step="optimize", progress=PROGRESS["optimize"])
    work = version.storage_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        request = _request(
            version, fmt, model_path, options, work, known_answer=version.known_answer_path
        )
        sandbox = choose_sandbox(
            fmt, container=None, limits=conversion_limits(), trusted_local=False
        )
        relay = _relay(version)
        outcome = convert_model(
            request, sandbox, on_step=lambda e: None if e.step == "load" else relay(e)
        )
        report = outcome.report
        served = model_path
        if report.served_file != model_path.name:
            # Beside the upload, so external data files (same folder) are found.
            served = model_path.parent / f"served-{report.served_file}"
            for produced in request.out_dir.iterdir():
                if produced.name == "model.onnx":
                    shutil.move(produced, served)
                elif produced.name.startswith(("model.optimized.onnx", "model.int8.onnx")):
                    shutil.move(produced, model_path.parent / produced.name)
            if outcome.known_answer_path is not None:
                shutil.move(outcome.known_answer_path, version.known_answer_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return served, report


def _tensor_text(tensor: dict[str, Any]) -> str:
    dims = ",".join("?" if d < 0 else str(d) for d in tensor["shape"])
    return f"{tensor['name']} {tensor['datatype']}[{dims}]"


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
