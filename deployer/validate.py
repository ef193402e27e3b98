"""Validate an uploaded ONNX model in a sandbox: the conversion container, or a limited child.

With a Docker engine the model is loaded and run by ``deployer.onnx_inspect`` inside
a throwaway container from the converter image, the same sandbox as the formats
that are converted; onnxruntime then never loads the upload on the host. Without
one (Python-only installs), the same module runs in a child process under memory
and time limits.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer.errors import DeployerError
from deployer.onnx_inspect import KNOWN_ANSWER_FILE
from deployer.sandbox import RESULT_FILE, Limits, read_result, run_child
from deployer.signature import Signature

if TYPE_CHECKING:
    from deployer.convert.runner import ContainerSandbox

MODULE = "deployer.onnx_inspect"


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
    sandbox: str = "child-process"


def sample_note(details: dict[str, Any]) -> str:
    """How the known answer's input was chosen, for the timeline and the version page."""
    shapes = details.get("sample_shapes") or {}
    shape_text = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    if details.get("sample_source") == "uploaded":
        return f"on the uploaded sample ({shape_text})"
    generated = details.get("generated_sample") or {}
    tries = generated.get("attempts") or []
    failed = [a for a in tries if a.get("error")]
    tried = ""
    if failed:
        sizes = ", ".join(f"batch {a['batch']} x {a['size']}" for a in failed)
        tried = f"; tried first, and failed: {sizes}"
    return f"on a generated sample ({shape_text}){tried}"


def validate_onnx(
    request: ValidationRequest, *, container: Callable[[], ContainerSandbox] | None = None
) -> ValidationReport:
    """Check, load and run the model once; raise ``DeployerError`` with a user-facing message.

    ``container`` builds the container sandbox (None: no Docker engine answers here,
    and the child process is used).
    """
    if container is not None:
        return _in_container(request, container())
    args = ["--model", str(request.model_path), "--out", str(request.work_dir)]
    if request.sample_path is not None:
        args += ["--sample", str(request.sample_path)]
    outcome = run_child(MODULE, args, work_dir=request.work_dir, limits=request.limits)
    return ValidationReport(
        signature=Signature.from_dict(outcome.result["signature"]),
        known_answer_path=request.work_dir / KNOWN_ANSWER_FILE,
        details={**outcome.result, "sandbox": "child-process"},
        duration_s=outcome.duration_s,
    )


def _in_container(request: ValidationRequest, sandbox: ContainerSandbox) -> ValidationReport:
    import onnx
    from google.protobuf.message import DecodeError

    from deployer.convert.external_data import external_data_check

    # The model travels with the external data files it names (the shared check, run
    # here on the protobuf without its data, refuses any that would leave its folder).
    # A file that does not parse travels alone: the container says what is wrong with it.
    files = {"model.onnx": request.model_path}
    try:
        proto = onnx.load(str(request.model_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError):
        proto = None
    if proto is not None:
        for location in external_data_check(proto, request.model_path.parent):
            files[location] = request.model_path.parent / location
    args = ["--model", "/work/in/model.onnx", "--out", "/work/out"]
    if request.sample_path is not None:
        name = "sample" + "".join(request.sample_path.suffixes[-1:])[:10]
        files[f"_sample/{name}"] = request.sample_path
        args += ["--sample", f"/work/in/_sample/{name}"]
    args += ["--result", f"/work/out/{RESULT_FILE}"]
    out = request.work_dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    duration = sandbox.run_module(MODULE, args, files, out)
    result = read_result(out / RESULT_FILE)
    if result is None or "signature" not in result:
        raise DeployerError("Validation ended without a result.", code="no_output")
    known = request.work_dir / KNOWN_ANSWER_FILE
    (out / KNOWN_ANSWER_FILE).replace(known)
    return ValidationReport(
        signature=Signature.from_dict(result["signature"]),
        known_answer_path=known,
        details={**result, "sandbox": sandbox.name},
        duration_s=duration,
        sandbox=sandbox.name,
    )
