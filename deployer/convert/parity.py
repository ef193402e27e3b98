"""Compare two models' outputs on the same inputs: the proof that a conversion is faithful."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deployer.convert.report import CheckResult, OutputCheck, Tolerance
from deployer.samples import Arrays
from deployer.signature import TensorSpec

# Datatypes compared with a tolerance; all others (labels, ids, strings) exactly.
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})


def compare_outputs(
    reference: Arrays,
    candidate: Arrays,
    specs: Sequence[TensorSpec],
    tolerance_for: Callable[[str], Tolerance],
) -> tuple[OutputCheck, ...]:
    """One ``OutputCheck`` per output of the candidate's signature."""
    checks = []
    for spec in specs:
        got = candidate.get(spec.name)
        want = reference.get(spec.name)
        tolerance = tolerance_for(spec.datatype)
        if got is None or want is None:
            checks.append(
                OutputCheck(
                    name=spec.name,
                    datatype=spec.datatype,
                    kind="missing",
                    elements=0,
                    passed=False,
                    note="the original model gave no value for this output"
                    if want is None
                    else "the ONNX model gave no value for this output",
                )
            )
            continue
        checks.append(_compare_one(spec, np.asarray(want), np.asarray(got), tolerance))
    return tuple(checks)


def _compare_one(
    spec: TensorSpec, want: np.ndarray[Any, Any], got: np.ndarray[Any, Any], tolerance: Tolerance
) -> OutputCheck:
    note = ""
    if want.shape != got.shape:
        if want.size != got.size:
            return OutputCheck(
                name=spec.name,
                datatype=spec.datatype,
                kind="shape",
                elements=int(got.size),
                passed=False,
                note=f"shapes differ: original {list(want.shape)}, ONNX {list(got.shape)}",
            )
        # sklearn's predict() gives (n,), the ONNX regressor (n, 1): same numbers.
        note = f"original shape {list(want.shape)} compared as {list(got.shape)}"
        want = want.reshape(got.shape)
    if spec.datatype in FLOAT_TYPES and want.dtype.kind in "fiub":
        return _compare_floats(
            spec, want.astype(np.float64), got.astype(np.float64), tolerance, note
        )
    return _compare_exact(spec, want, got, tolerance, note)


def _compare_floats(
    spec: TensorSpec,
    want: np.ndarray[Any, Any],
    got: np.ndarray[Any, Any],
    tolerance: Tolerance,
    note: str,
) -> OutputCheck:
    both_nan = np.isnan(want) & np.isnan(got)
    diff = np.where(both_nan, 0.0, np.abs(want - got))
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = np.abs(want)
    allowed = tolerance.atol + tolerance.rtol * scale
    bad = int(np.count_nonzero(diff > allowed))
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.maximum(scale, np.finfo(np.float32).tiny))
    max_rel = float(rel.max()) if rel.size else 0.0
    return OutputCheck(
        name=spec.name,
        datatype=spec.datatype,
        kind="float",
        elements=int(diff.size),
        passed=bad == 0,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        mismatched=bad,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        note=note,
    )


def _compare_exact(
    spec: TensorSpec,
    want: np.ndarray[Any, Any],
    got: np.ndarray[Any, Any],
    tolerance: Tolerance,
    note: str,
) -> OutputCheck:
    if want.dtype.kind in "USO" or got.dtype.kind in "USO":
        equal = np.array(
            [_text(a) == _text(b) for a, b in zip(want.ravel(), got.ravel(), strict=True)],
            dtype=bool,
        )
    else:
        equal = (want == got).ravel()
    total = int(equal.size)
    agreement = float(equal.mean()) if total else 1.0
    return OutputCheck(
        name=spec.name,
        datatype=spec.datatype,
        kind="exact",
        elements=total,
        passed=agreement >= tolerance.min_agreement,
        mismatched=int(total - int(equal.sum())),
        agreement=agreement,
        note=note,
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_result(
    checks: tuple[OutputCheck, ...],
    *,
    inputs: Arrays,
    inputs_source: str,
    reference: str = "original",
    reference_ms: float | None = None,
    candidate_ms: float | None = None,
) -> CheckResult:
    """A ``CheckResult``: passed when every output passed."""
    rows = max((int(a.shape[0]) for a in inputs.values() if a.ndim), default=1)
    return CheckResult(
        passed=bool(checks) and all(c.passed for c in checks),
        inputs_source=inputs_source,
        rows=rows,
        outputs=checks,
        reference=reference,
        reference_ms=reference_ms,
        candidate_ms=candidate_ms,
    )


def median_ms(run: Callable[[], object], *, repeats: int = 15, budget_s: float = 5.0) -> float:
    """Median wall time of ``run()`` in milliseconds, after one warm-up call."""
    run()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 4)
