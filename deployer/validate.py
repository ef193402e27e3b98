"""Validate an uploaded ONNX model in a limited child process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.onnx_inspect import KNOWN_ANSWER_FILE
from deployer.sandbox import Limits, run_child
from deployer.signature import Signature


@dataclass(frozen=True)
class ValidationRequest:
    """One model file to validate, with an optional sample input."""

    model_path: Path
    work_dir: Path
    sample_path: Path | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class ValidationReport:
    """What validation found: the signature, the known answer and the facts for MLflow."""

    signature: Signature
    known_answer_path: Path
    details: dict[str, Any]
    duration_s: float


def validate_onnx(request: ValidationRequest) -> ValidationReport:
    """Check, load and run the model once; raise ``DeployerError`` with a user-facing message."""
    args = ["--model", str(request.model_path), "--out", str(request.work_dir)]
    if request.sample_path is not None:
        args += ["--sample", str(request.sample_path)]
    outcome = run_child(
        "deployer.onnx_inspect", args, work_dir=request.work_dir, limits=request.limits
    )
    return ValidationReport(
        signature=Signature.from_dict(outcome.result["signature"]),
        known_answer_path=request.work_dir / KNOWN_ANSWER_FILE,
        details=outcome.result,
        duration_s=outcome.duration_s,
    )
