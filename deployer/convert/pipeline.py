"""One upload, from the uploaded file to the ONNX model that is served: the whole operation.

    detect -> [extract] -> validate -> [optimize] [-> quantize]                   (ONNX uploads)
    detect -> load -> convert -> check -> [optimize] [-> quantize] -> validate    (the others)

The caller (the portal) hands over one :class:`PipelineRequest` and a callback, and gets
one :class:`ConversionResult` back. Every step is reported through the callback as it
starts (with the share of the work done so far, which only grows) and when it ends
(with a message for the timeline). Nothing here knows about rows or Django.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deployer.convert.archive import ArchiveLimits, extract_onnx_archive
from deployer.convert.formats import CONVERTED_FORMATS, LABELS, Detection, Format, resolve
from deployer.convert.onnx_tools import newest_runtime_opset
from deployer.convert.report import ConversionOptions, ConversionReport
from deployer.convert.runner import (
    ContainerSandbox,
    ConversionRequest,
    SandboxFactory,
    StepEvent,
    choose_sandbox,
    convert_model,
)
from deployer.errors import DeployerError
from deployer.sandbox import Limits
from deployer.validate import ValidationReport, ValidationRequest, sample_note, validate_onnx

CONVERTED_DIR = "converted"
EXTRACTED_DIR = "extracted"
WORK_DIR = "work"

Phase = Literal["validating", "converting"]
EventKind = Literal["start", "done", "note"]
Level = Literal["info", "warning", "error"]

ContainerSource = Callable[[], SandboxFactory | None]
"""Called once the format is known: returns what builds the container sandbox of a
converter family (for a conversion, and, with the core family, for the validation of
every upload), or None when no Docker engine
answers. It may raise to stop here (the portal does when this process may not start
containers and hands the upload on)."""


@dataclass(frozen=True)
class ConversionEvent:
    """A step starts (``start``), ends (``done``), or says something on the way (``note``)."""

    kind: EventKind
    step: str
    phase: Phase
    # Share of the whole operation done when this was reported, 0..1; never goes down.
    progress: float
    message: str = ""
    level: Level = "info"
    duration_ms: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


EventCallback = Callable[[ConversionEvent], None]


@dataclass(frozen=True)
class PipelineRequest:
    """One uploaded file and everything the engine needs to make it servable."""

    upload: Path
    file_name: str
    # Where ``converted/`` or ``extracted/`` (the served model) and scratch work go.
    storage_dir: Path
    # Where the known answer (inputs and outputs of the served model) is written.
    known_answer_path: Path
    stated_format: str = ""
    sample_path: Path | None = None
    options: ConversionOptions = field(default_factory=ConversionOptions)
    limits: Limits = field(default_factory=lambda: Limits(memory_mb=4096, timeout_s=600))
    validation_limits: Limits = field(default_factory=Limits)
    archive_limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    trusted_local: bool = False
    container: ContainerSource | None = None
    # An earlier detection of this same file (a run handed on from another worker).
    detection: Detection | None = None


@dataclass(frozen=True)
class ConversionResult:
    """The served model and what was learnt on the way."""

    format: Format
    evidence: str
    served_path: Path
    signature: dict[str, Any]
    validation: dict[str, Any]
    conversion: ConversionReport | None = None


class CheckFailed(DeployerError):
    """The converted model does not compute what the original does."""

    code = "check_failed"

    def __init__(self, message: str, *, report: ConversionReport) -> None:
        super().__init__(message)
        self.report = report


def plan(fmt: Format, options: ConversionOptions) -> list[str]:
    """The steps an upload of ``fmt`` goes through, in order."""
    variants = (["optimize"] if options.optimize else []) + (
        ["quantize"] if options.quantize else []
    )
    if fmt in CONVERTED_FORMATS:
        return ["detect", "load", "convert", "check", *variants, "validate"]
    extract = ["extract"] if fmt == Format.ONNX_ARCHIVE else []
    return ["detect", *extract, "validate", *variants]


class _Reporter:
    """Turns steps into events whose progress follows the plan and never goes down."""

    def __init__(self, on_event: EventCallback) -> None:
        self.on_event = on_event
        self.steps = ["detect"]
        self.progress = 0.0

    def start(self, step: str, phase: Phase) -> None:
        if step in self.steps:
            self.progress = max(self.progress, self.steps.index(step) / len(self.steps))
        self.on_event(ConversionEvent("start", step, phase, round(self.progress, 4)))

    def done(
        self,
        step: str,
        phase: Phase,
        message: str,
        *,
        level: Level = "info",
        duration_ms: float | None = None,
        data: dict[str, Any] | None = None,
        kind: EventKind = "done",
    ) -> None:
        self.on_event(
            ConversionEvent(
                kind,
                step,
                phase,
                round(self.progress, 4),
                message=message,
                level=level,
                duration_ms=duration_ms,
                data=dict(data or {}),
            )
        )

    def following(self, step: str) -> str | None:
        """The planned step after ``step``, or None at the end or for an unplanned step."""
        if step not in self.steps:
            return None
        index = self.steps.index(step) + 1
        return self.steps[index] if index < len(self.steps) else None


def convert(request: PipelineRequest, on_event: EventCallback) -> ConversionResult:
    """Make the upload servable: detect, convert or extract, check, optimize, validate.

    Raises ``DeployerError`` (``CheckFailed`` carries the report) with a message for the
    uploader; whatever ``request.container`` raises passes through.
    """
    reporter = _Reporter(on_event)
    timer = _Timer()
    detection = request.detection
    if detection is None:
        reporter.start("detect", "validating")
        detection = resolve(
            request.upload, stated=request.stated_format, file_name=request.file_name
        )
        fresh = True
    else:
        fresh = False
    assert detection.format is not None
    fmt = detection.format
    reporter.steps = plan(fmt, request.options)
    if fresh:
        stated = request.stated_format
        reporter.done(
            "detect",
            "validating",
            f"{LABELS[fmt]}: {detection.evidence}"
            + (f" (stated: {stated})" if stated and stated != fmt.value else ""),
            duration_ms=timer.lap(),
            data={"format": fmt.value, "evidence": detection.evidence},
        )
    # Asked after the detection is reported: when this process hands the upload on, the
    # next one starts from that detection (``request.detection``) and does not report it again.
    # ONNX uploads too: they are validated in the container sandbox when Docker answers.
    container = request.container() if request.container else None
    if fmt in CONVERTED_FORMATS:
        report = _convert(request, fmt, detection.evidence, container, reporter)
        served = request.storage_dir / CONVERTED_DIR / "model.onnx"
        validation = _validate(request, served, reporter, container)
        return ConversionResult(
            fmt,
            detection.evidence,
            served,
            validation.signature.to_dict(),
            validation.details,
            report,
        )
    model_path = request.upload
    if fmt == Format.ONNX_ARCHIVE:
        model_path = _extract(request, reporter)
    validation = _validate(request, model_path, reporter, container)
    served = model_path
    optimized: ConversionReport | None = None
    if request.options.optimize or request.options.quantize:
        served, optimized = _optimize_onnx(request, fmt, model_path, reporter)
    return ConversionResult(
        fmt,
        detection.evidence,
        served,
        validation.signature.to_dict(),
        validation.details,
        optimized,
    )


class _Timer:
    """Milliseconds since the last lap."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = (now - self._last) * 1000, now
        return round(elapsed, 2)


def _extract(request: PipelineRequest, reporter: _Reporter) -> Path:
    reporter.start("extract", "validating")
    timer = _Timer()
    target = request.storage_dir / EXTRACTED_DIR
    shutil.rmtree(target, ignore_errors=True)
    extracted = extract_onnx_archive(request.upload, target, limits=request.archive_limits)
    reporter.done(
        "extract",
        "validating",
        f"Extracted {len(extracted.files)} file(s), {extracted.total_bytes / 1e6:.1f} MB; "
        f"model {extracted.model_path.relative_to(target)}",
        duration_ms=timer.lap(),
        data={"files": list(extracted.files)[:50]},
    )
    return extracted.model_path


def _validate(
    request: PipelineRequest,
    model_path: Path,
    reporter: _Reporter,
    container: Callable[[], ContainerSandbox] | None,
) -> ValidationReport:
    reporter.start("validate", "validating")
    timer = _Timer()
    work_dir = request.storage_dir / WORK_DIR
    try:
        report = validate_onnx(
            ValidationRequest(
                model_path=model_path,
                work_dir=work_dir,
                sample_path=request.sample_path,
                limits=request.validation_limits,
            ),
            container=container,
        )
        shutil.move(report.known_answer_path, request.known_answer_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    inputs = ", ".join(_tensor_text(t) for t in report.signature.to_dict()["inputs"])
    reporter.done(
        "validate",
        "validating",
        f"Valid ONNX model; inputs {inputs}; known answer recorded {sample_note(report.details)}",
        duration_ms=timer.lap(),
        data={"timings": report.details.get("timings", {})},
    )
    return report


def _job_request(
    request: PipelineRequest,
    fmt: Format,
    source: Path,
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
        options=request.options,
        sample_path=request.sample_path,
        known_answer=known_answer,
        detected=detected,
        serving_opset=newest_runtime_opset(),
        limits=request.limits,
    )


def _relay(reporter: _Reporter, options: ConversionOptions) -> Callable[[StepEvent], None]:
    """The sandbox's finished steps as timeline entries, each followed by the next start."""

    def on_step(event: StepEvent) -> None:
        level: Level = "info"
        failed = event.step == "check" and not event.data.get("passed", True)
        if failed:
            level = "warning" if options.override_reason else "error"
        reporter.done(
            event.step,
            "converting",
            event.message,
            level=level,
            duration_ms=event.duration_ms,
            data=event.data,
        )
        following = reporter.following(event.step)
        if following is not None and not (failed and not options.override_reason):
            phase: Phase = "validating" if following == "validate" else "converting"
            reporter.start(following, phase)

    return on_step


def _convert(
    request: PipelineRequest,
    fmt: Format,
    evidence: str,
    container: SandboxFactory | None,
    reporter: _Reporter,
) -> ConversionReport:
    reporter.start("load", "converting")
    work = request.storage_dir / WORK_DIR
    target = request.storage_dir / CONVERTED_DIR
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        sandbox = choose_sandbox(
            fmt, container=container, limits=request.limits, trusted_local=request.trusted_local
        )
        job = _job_request(request, fmt, request.upload, work, detected=evidence)
        outcome = convert_model(job, sandbox, on_step=_relay(reporter, request.options))
        target.mkdir(parents=True)
        for produced in job.out_dir.iterdir():
            if produced.name.startswith("model.onnx"):
                shutil.move(produced, target / produced.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = outcome.report
    if not report.passed:
        failures = "; ".join(o.summary() for o in report.check.failures()) if report.check else ""
        if not request.options.override_reason:
            raise CheckFailed(
                f"The converted model does not compute what the original does: {failures}. The "
                "report shows every output. If these differences are acceptable, upload again "
                "with a larger tolerance (atol/rtol) or with an override reason; otherwise the "
                "model uses something that does not convert faithfully (randomness, another "
                "opset may help).",
                report=report,
            )
        reporter.done(
            "check",
            "converting",
            f"The check failed ({failures}) and was overridden by the uploader: "
            f"{request.options.override_reason}",
            level="warning",
            kind="note",
            data={"override_reason": request.options.override_reason},
        )
    return report


def _optimize_onnx(
    request: PipelineRequest, fmt: Format, model_path: Path, reporter: _Reporter
) -> tuple[Path, ConversionReport]:
    """onnxruntime's optimized form of an ONNX upload, served when it passes the check."""
    first = "optimize" if request.options.optimize else "quantize"
    reporter.start(first, "converting")
    work = request.storage_dir / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    try:
        job = _job_request(request, fmt, model_path, work, known_answer=request.known_answer_path)
        sandbox = choose_sandbox(fmt, container=None, limits=request.limits, trusted_local=False)
        relay = _relay(reporter, request.options)
        outcome = convert_model(
            job, sandbox, on_step=lambda e: None if e.step == "load" else relay(e)
        )
        report = outcome.report
        served = model_path
        if report.served_file != model_path.name:
            # Beside the upload, so external data files (same folder) are found.
            served = model_path.parent / f"served-{report.served_file}"
            for produced in job.out_dir.iterdir():
                if produced.name == "model.onnx":
                    shutil.move(produced, served)
                elif produced.name.startswith(("model.optimized.onnx", "model.int8.onnx")):
                    shutil.move(produced, model_path.parent / produced.name)
            if outcome.known_answer_path is not None:
                shutil.move(outcome.known_answer_path, request.known_answer_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return served, report


def _tensor_text(tensor: dict[str, Any]) -> str:
    dims = ",".join("?" if d < 0 else str(d) for d in tensor["shape"])
    return f"{tensor['name']} {tensor['datatype']}[{dims}]"
