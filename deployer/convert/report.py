"""The conversion's options and its report: what was converted, how, and the proof.

Both are plain dataclasses that round-trip through JSON: the options travel into
the sandbox as ``options.json``, the report comes out as ``report.json`` and is
stored on the version, shown by the API and logged to MLflow.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError

REPORT_FILE = "report.json"
OPTIONS_FILE = "options.json"
QUANTIZE_CHOICES = ("", "dynamic_int8")


class InvalidOptions(DeployerError):
    """Conversion options that cannot be used."""

    code = "invalid_options"


@dataclass(frozen=True)
class Tolerance:
    """How far an output may be from the original's: ``|a - b| <= atol + rtol * |b|``.

    Labels, integers and strings are compared exactly; ``min_agreement`` is the
    share of them that must agree (1.0: all).
    """

    atol: float
    rtol: float
    min_agreement: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tolerance:
        return cls(
            atol=float(data["atol"]),
            rtol=float(data["rtol"]),
            min_agreement=float(data.get("min_agreement", 1.0)),
        )


# Defaults per V2 datatype: float32 kernels differ from the original's in the last
# bits (another summation order, fused ops), float16 in the third decimal.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "FP64": Tolerance(atol=1e-7, rtol=1e-6),
    "FP32": Tolerance(atol=1e-4, rtol=1e-3),
    "FP16": Tolerance(atol=1e-2, rtol=1e-2),
    "BF16": Tolerance(atol=2e-2, rtol=2e-2),
}
# int8 weights change the numbers on purpose; its own check is about staying useful.
DEFAULT_QUANTIZED_TOLERANCE = Tolerance(atol=5e-2, rtol=1e-1, min_agreement=0.95)


def parse_tolerances(text: str) -> dict[str, Tolerance]:
    """``FP32=1e-4/1e-3,FP16=1e-2/1e-2`` (datatype=atol/rtol) over the defaults."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        datatype, _, values = item.partition("=")
        atol, _, rtol = values.partition("/")
        try:
            tolerance = Tolerance(atol=float(atol), rtol=float(rtol))
        except ValueError:
            raise InvalidOptions(
                f"Tolerance {item!r} is not DATATYPE=ATOL/RTOL (for example FP32=1e-4/1e-3)."
            ) from None
        _check_tolerance(tolerance)
        tolerances[datatype.strip().upper()] = tolerance
    return tolerances


def _check_tolerance(tolerance: Tolerance) -> None:
    values = (tolerance.atol, tolerance.rtol)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise InvalidOptions("Tolerances must be finite numbers of at least 0.")
    if not 0 <= tolerance.min_agreement <= 1:
        raise InvalidOptions("The share of labels that must agree is between 0 and 1.")


@dataclass(frozen=True)
class ConversionOptions:
    """What the uploader chose; every field has a default that needs no choice."""

    # ONNX opset to export to; None: the newest the serving onnxruntime and the converter share.
    opset: int | None = None
    dynamic_batch: bool = True
    # Per-upload tolerance for every float output (None: the per-datatype defaults).
    atol: float | None = None
    rtol: float | None = None
    optimize: bool = True
    quantize: str = ""
    # A written reason to register the model although its check failed.
    override_reason: str = ""
    # Filled in by the engine, not the uploader: the defaults in force on this server.
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    quantized_tolerance: Tolerance = DEFAULT_QUANTIZED_TOLERANCE

    def __post_init__(self) -> None:
        if self.opset is not None and not 7 <= self.opset <= 30:
            raise InvalidOptions(f"Opset {self.opset} is out of range; choose 7 to 30 or none.")
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidOptions(
                f"Unknown quantization {self.quantize!r}; choose 'dynamic_int8' or none."
            )
        for value in (self.atol, self.rtol):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidOptions("Tolerances must be finite numbers of at least 0.")
        if len(self.override_reason) > 2000:
            raise InvalidOptions("Keep the override reason under 2000 characters.")

    def tolerance_for(self, datatype: str) -> Tolerance:
        """The tolerance for one output's datatype, with this upload's override applied."""
        base = self.tolerances.get(datatype) or self.tolerances.get(
            "FP32", DEFAULT_TOLERANCES["FP32"]
        )
        return replace(
            base,
            atol=base.atol if self.atol is None else self.atol,
            rtol=base.rtol if self.rtol is None else self.rtol,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tolerances"] = {k: v.to_dict() for k, v in self.tolerances.items()}
        data["quantized_tolerance"] = self.quantized_tolerance.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionOptions:
        """Options from JSON (an upload's stored options or options.json); unknown keys fail."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidOptions(f"Unknown conversion option(s): {', '.join(unknown)}.")
        values = dict(data)
        try:
            if values.get("opset") is not None:
                values["opset"] = int(values["opset"])
            for key in ("atol", "rtol"):
                if values.get(key) is not None:
                    values[key] = float(values[key])
            if "tolerances" in values:
                values["tolerances"] = {
                    str(k): Tolerance.from_dict(v) for k, v in values["tolerances"].items()
                }
            if "quantized_tolerance" in values:
                values["quantized_tolerance"] = Tolerance.from_dict(values["quantized_tolerance"])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidOptions(f"The conversion options are malformed ({exc}).") from None
        return cls(**values)


@dataclass(frozen=True)
class OutputCheck:
    """One output compared between the original model and the ONNX model."""

    name: str
    datatype: str
    # "float": compared with a tolerance; "exact": labels, integers, strings.
    kind: str
    elements: int
    passed: bool
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    mismatched: int = 0
    agreement: float | None = None
    atol: float | None = None
    rtol: float | None = None
    note: str = ""

    def summary(self) -> str:
        if self.kind == "float" and self.max_abs_diff is not None:
            return (
                f"{self.name}: max abs {self.max_abs_diff:.3g}, max rel {self.max_rel_diff:.3g} "
                f"(atol {self.atol:g}, rtol {self.rtol:g}): {self.why()}"
            )
        if self.agreement is not None:
            return f"{self.name}: {self.agreement:.1%} agree"
        return f"{self.name}: {self.note or 'not compared'}"

    def why(self) -> str:
        """Why a float output passed or failed: an element passes when its difference is
        at most atol + rtol * |expected|, so a large relative difference on a value near
        zero can pass on atol alone."""
        atol, rtol = self.atol or 0.0, self.rtol or 0.0
        abs_diff, rel_diff = self.max_abs_diff or 0.0, self.max_rel_diff or 0.0
        if not self.passed:
            return (
                f"fail, {self.mismatched} of {self.elements} element(s) differ by more than "
                "atol + rtol × |expected|"
            )
        if abs_diff <= atol:
            return "pass, every difference is within atol"
        if rel_diff <= rtol:
            return "pass, every difference is within rtol of its expected value"
        return "pass, every difference is within atol + rtol × |expected|"


@dataclass(frozen=True)
class CheckResult:
    """The proof: both models on the same inputs, every output compared."""

    passed: bool
    inputs_source: str
    rows: int
    outputs: tuple[OutputCheck, ...]
    reference: str = "original"
    reference_ms: float | None = None
    candidate_ms: float | None = None

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        details = "; ".join(o.summary() for o in self.outputs)
        return f"check {verdict} on {self.rows} {self.inputs_source} row(s): {details}"

    def failures(self) -> list[OutputCheck]:
        return [o for o in self.outputs if not o.passed]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckResult:
        outputs = tuple(OutputCheck(**o) for o in data.get("outputs", []))
        return cls(**{**data, "outputs": outputs})


@dataclass(frozen=True)
class VariantReport:
    """An optimized or quantized variant of the converted model and its own check."""

    kind: str
    file: str
    size_bytes: int
    used: bool
    reason: str
    check: CheckResult | None = None
    latency_ms: float | None = None
    baseline_latency_ms: float | None = None
    duration_ms: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantReport:
        check = data.get("check")
        return cls(**{**data, "check": CheckResult.from_dict(check) if check else None})


@dataclass(frozen=True)
class ConversionReport:
    """Everything about one conversion, as stored on the version and in MLflow."""

    source_format: str
    detected: str
    converter: str
    versions: dict[str, str]
    opset: int | None
    opset_source: str
    dynamic_batch: bool
    signature: dict[str, Any]
    served_file: str
    passed: bool
    check: CheckResult | None = None
    optimization: VariantReport | None = None
    quantization: VariantReport | None = None
    override_reason: str = ""
    sandbox: str = ""
    notes: tuple[str, ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        values = dict(data)
        if values.get("check"):
            values["check"] = CheckResult.from_dict(values["check"])
        for key in ("optimization", "quantization"):
            if values.get(key):
                values[key] = VariantReport.from_dict(values[key])
        values["notes"] = tuple(values.get("notes", ()))
        return cls(**values)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> ConversionReport:
        return cls.from_dict(json.loads(path.read_text()))

    def metrics(self) -> dict[str, float]:
        """Numbers for MLflow: differences per output, latencies, step timings."""
        values: dict[str, float] = {f"conversion_{k}": v for k, v in self.timings_ms.items()}
        if self.check is not None:
            values["check_passed"] = float(self.check.passed)
            for name, number in (
                ("original_ms", self.check.reference_ms),
                ("onnx_ms", self.check.candidate_ms),
            ):
                if number is not None:
                    values[f"check_{name}"] = number
            for output in self.check.outputs:
                key = _metric_key(output.name)
                if output.max_abs_diff is not None:
                    values[f"max_abs_diff.{key}"] = output.max_abs_diff
                if output.max_rel_diff is not None:
                    values[f"max_rel_diff.{key}"] = output.max_rel_diff
                if output.agreement is not None:
                    values[f"agreement.{key}"] = output.agreement
        for variant in (self.optimization, self.quantization):
            if variant is None:
                continue
            values[f"{variant.kind}_used"] = float(variant.used)
            if variant.latency_ms is not None:
                values[f"{variant.kind}_latency_ms"] = variant.latency_ms
            if variant.check is not None:
                for output in variant.check.outputs:
                    if output.max_abs_diff is not None:
                        key = _metric_key(output.name)
                        values[f"{variant.kind}_max_abs_diff.{key}"] = output.max_abs_diff
        return {k: v for k, v in values.items() if math.isfinite(v)}

    def params(self) -> dict[str, str]:
        """Short strings for MLflow parameters."""
        params = {
            "source_format": self.source_format,
            "converter": self.converter,
            "opset": str(self.opset or ""),
            "dynamic_batch": str(self.dynamic_batch).lower(),
            "served_file": self.served_file,
            "sandbox": self.sandbox,
            "check_inputs": self.check.inputs_source if self.check else "",
        }
        params.update({f"version_{k}": v for k, v in self.versions.items()})
        if self.override_reason:
            params["override_reason"] = self.override_reason[:500]
        return params


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)[:200]
