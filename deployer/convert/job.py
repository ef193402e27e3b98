"""The conversion job: the code that runs inside the sandbox (container or limited child).

    python -m deployer.convert.job --source FILE --format F --options options.json
        [--sample S] [--known-answer KA] --serving-opset N --out DIR --result R

It loads the original model, converts it to ONNX, runs both on the same inputs
and compares every output (the check), saves onnxruntime's optimized model when
it passes the same check, optionally quantizes to int8 with its own check, and
writes into DIR only the served ONNX model (``model.onnx``, with its external data
files if it has any) and ``report.json``. Each finished step is appended to
``progress.jsonl`` in DIR so the caller can show it live.

For an ONNX upload (format ``onnx``/``onnx_archive``) there is nothing to load or
convert: the reference is the known answer recorded by validation, and the job
only optimizes (and quantizes), writing a new ``known_answer.npz`` when it
changes the served model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployer.convert import onnx_tools
from deployer.convert.external_data import external_data_check
from deployer.convert.formats import (
    ONNX_FORMATS,
    SKLEARN_FORMATS,
    TABLE_FORMATS,
    TENSORFLOW_FORMATS,
    TREE_FORMATS,
    Format,
)
from deployer.convert.parity import check_result, compare_outputs, median_ms
from deployer.convert.report import (
    REPORT_FILE,
    CheckResult,
    ConversionOptions,
    ConversionReport,
    Tolerance,
    VariantReport,
)
from deployer.errors import DeployerError, InvalidModel, InvalidSample
from deployer.samples import (
    Arrays,
    conform,
    generate_sample,
    load_known_answer,
    read_sample,
    save_known_answer,
)
from deployer.sandbox import HANDLED_ERROR_EXIT, write_result
from deployer.signature import Signature, session_signature

SERVED_FILE = "model.onnx"
PROGRESS_FILE = "progress.jsonl"
# Progress lines are also printed with this mark, for sandboxes whose files are only
# readable after they exit (containers).
PROGRESS_MARK = "@@modelport-progress "
KNOWN_ANSWER_FILE = "known_answer.npz"
# Rows generated for the check when the batch axis is free: enough to see a flipped label.
CHECK_ROWS = 16


class Progress:
    """Appends one JSON line per finished step; the caller tails the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.timings: dict[str, float] = {}

    def step(self, step: str, started: float, message: str, **data: Any) -> None:
        duration = round((time.perf_counter() - started) * 1000, 2)
        self.timings[step] = duration
        line = {"step": step, "duration_ms": duration, "message": message, "data": data}
        text = json.dumps(line, default=str)
        with self.path.open("a") as handle:
            handle.write(text + "\n")
            handle.flush()
        print(PROGRESS_MARK + text, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


def _load_converter(source: Path, fmt: Format) -> Any:
    if fmt in SKLEARN_FORMATS:
        from deployer.convert.sklearn_convert import SklearnConverter

        return SklearnConverter(source, fmt)
    if fmt in TREE_FORMATS:
        from deployer.convert.trees_convert import TreesConverter

        return TreesConverter(source, fmt)
    if fmt in TENSORFLOW_FORMATS:
        from deployer.convert.tf_convert import TensorflowConverter

        return TensorflowConverter(source, fmt)
    if fmt == Format.TRANSFORMERS:
        from deployer.convert.hf_convert import TransformersConverter

        return TransformersConverter(source, fmt)
    if fmt == Format.TORCH_STATE_DICT:
        from deployer.convert.state_dict_convert import StateDictConverter

        return StateDictConverter(source, fmt)
    from deployer.convert.torch_convert import TorchConverter

    return TorchConverter(source, fmt)


def _choose_opset(
    options: ConversionOptions, serving_opset: int, converter_max: int
) -> tuple[int, str]:
    if options.opset is None:
        opset = min(serving_opset, converter_max)
        return opset, (
            f"default: the newest opset both the serving onnxruntime ({serving_opset}) and the "
            f"converter ({converter_max}) support"
        )
    if options.opset > serving_opset:
        raise InvalidModel(
            f"Opset {options.opset} is newer than the serving onnxruntime supports "
            f"({serving_opset}). Choose {serving_opset} or lower, or leave the opset empty.",
            code="opset_unsupported",
        )
    if options.opset > converter_max:
        raise InvalidModel(
            f"The converter supports opsets up to {converter_max}, not {options.opset}. Choose "
            f"{converter_max} or lower, or leave the opset empty.",
            code="opset_unsupported",
        )
    return options.opset, "chosen by the uploader"


def _check_inputs(signature: Signature, sample: Arrays | None, dynamic: bool) -> tuple[Arrays, str]:
    if sample is not None:
        return conform(sample, signature), "uploaded"
    return generate_sample(signature, batch=CHECK_ROWS if dynamic else 1), "generated"


def _copy_served(model: Path, out_dir: Path) -> None:
    """Copy the served model (and the external data files it names) into the output folder."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for location in external_data_check(proto, model.parent):
        target = out_dir / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.parent / location, target)
    shutil.copyfile(model, out_dir / SERVED_FILE)


def _variant(
    kind: str,
    build: Callable[[Path, Path], None],
    source: Path,
    target: Path,
    inputs: Arrays,
    reference: Arrays,
    tolerance_for: Callable[[str], Tolerance],
    baseline_ms: float | None,
    inputs_source: str,
) -> tuple[VariantReport, Any]:
    started = time.perf_counter()
    try:
        build(source, target)
        sess = onnx_tools.session(target)
        signature = session_signature(sess)
        values = onnx_tools.run(sess, inputs)
    except Exception as exc:  # a variant that fails is skipped, not fatal
        return (
            VariantReport(
                kind=kind,
                file=target.name,
                size_bytes=0,
                used=False,
                reason=f"could not be made: {_first_line(exc)}",
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            ),
            None,
        )
    checks = compare_outputs(reference, values, signature.outputs, tolerance_for)
    latency = median_ms(lambda: sess.run(None, inputs))
    check = check_result(
        checks,
        inputs=inputs,
        inputs_source=inputs_source,
        reference="original",
        candidate_ms=latency,
    )
    if check.passed:
        reason = "passed the same check, so it is the served model"
    else:
        reason = "failed its check, so it is not served: " + "; ".join(
            o.summary() for o in check.failures()
        )
    size = sum(p.stat().st_size for p in target.parent.glob(f"{target.name}*"))
    return (
        VariantReport(
            kind=kind,
            file=target.name,
            size_bytes=size,
            used=check.passed,
            reason=reason,
            check=check,
            latency_ms=latency,
            baseline_latency_ms=baseline_ms,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        ),
        sess if check.passed else None,
    )


def run_job(
    *,
    source: Path,
    fmt: Format,
    options: ConversionOptions,
    out_dir: Path,
    scratch: Path,
    serving_opset: int,
    sample_path: Path | None = None,
    known_answer: Path | None = None,
    detected: str = "",
    sandbox: str = "",
) -> ConversionReport:
    """Convert (or only optimize) one model; write the served model and report.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(out_dir / PROGRESS_FILE)
    versions = _runtime_versions()
    notes: list[str] = []
    if fmt in ONNX_FORMATS:
        if known_answer is None:
            raise InvalidModel("An ONNX upload is optimized after validation.", code="internal")
        model = source
        started = time.perf_counter()
        base_session = onnx_tools.session(model)
        signature = session_signature(base_session)
        inputs, reference = load_known_answer(known_answer)
        inputs = conform(inputs, signature)
        progress.step("load", started, "Loaded the ONNX model in onnxruntime")
        converter_name = "none (ONNX upload)"
        opset = onnx_tools.opsets_of(model).get("ai.onnx")
        opset_source = "as uploaded"
        inputs_source = "known answer"
        check: CheckResult | None = None
        baseline_ms: float | None = median_ms(lambda: base_session.run(None, inputs))
    else:
        started = time.perf_counter()
        converter = _load_converter(source, fmt)
        versions.update(converter.versions())
        progress.step("load", started, f"Loaded the {fmt.value} model", versions=versions)

        sample = _read_sample(sample_path, converter.input_names, fmt)
        opset, opset_source = _choose_opset(options, serving_opset, converter.max_opset)
        started = time.perf_counter()
        model = scratch / "converted.onnx"
        notes += converter.export(
            model, opset=opset, dynamic_batch=options.dynamic_batch, sample=sample
        )
        converter_name = converter.converter
        progress.step(
            "convert", started, f"Converted with {converter_name} at opset {opset}", notes=notes
        )

        started = time.perf_counter()
        base_session = onnx_tools.session(model)
        signature = session_signature(base_session)
        inputs, inputs_source = _check_inputs(signature, sample, options.dynamic_batch)
        try:
            reference = converter.run(inputs)
        except Exception as exc:  # the user's model raised on the inputs
            error = InvalidSample if inputs_source == "uploaded" else InvalidModel
            raise error(
                f"The original model failed on the {inputs_source} check input: "
                f"{_first_line(exc)}. Upload a sample input the model accepts.",
                code="original_failed",
            ) from exc
        candidate = onnx_tools.run(base_session, inputs)
        checks = compare_outputs(reference, candidate, signature.outputs, options.tolerance_for)
        check = check_result(
            checks,
            inputs=inputs,
            inputs_source=inputs_source,
            reference_ms=median_ms(lambda: converter.run(inputs)),
            candidate_ms=median_ms(lambda: base_session.run(None, inputs)),
        )
        baseline_ms = check.candidate_ms
        progress.step(
            "check",
            started,
            check.summary(),
            passed=check.passed,
            override=bool(options.override_reason),
        )

    served, served_session = model, base_session
    optimization = quantization = None
    proceed = check is None or check.passed or bool(options.override_reason)
    if proceed and options.optimize:
        started = time.perf_counter()
        optimization, opt_session = _variant(
            "optimized",
            onnx_tools.optimize,
            model,
            scratch / "model.optimized.onnx",
            inputs,
            reference,
            options.tolerance_for,
            baseline_ms,
            inputs_source,
        )
        if opt_session is not None:
            served, served_session = scratch / "model.optimized.onnx", opt_session
        progress.step("optimize", started, f"onnxruntime-optimized model {optimization.reason}")
    if proceed and options.quantize:
        started = time.perf_counter()
        quantization, q_session = _variant(
            options.quantize,
            onnx_tools.quantize_dynamic_int8,
            model,
            scratch / "model.int8.onnx",
            inputs,
            reference,
            lambda _datatype: options.quantized_tolerance,
            optimization.latency_ms if optimization and optimization.used else baseline_ms,
            inputs_source,
        )
        if q_session is not None:
            served, served_session = scratch / "model.int8.onnx", q_session
        progress.step("quantize", started, f"int8 model {quantization.reason}")

    _copy_served(served, out_dir)
    if fmt in ONNX_FORMATS and served != model:
        save_known_answer(
            out_dir / KNOWN_ANSWER_FILE, inputs, onnx_tools.run(served_session, inputs)
        )
    report = ConversionReport(
        source_format=fmt.value,
        detected=detected,
        converter=converter_name,
        versions=versions,
        opset=opset,
        opset_source=opset_source,
        dynamic_batch=session_signature(served_session).dynamic_batch,
        signature=session_signature(served_session).to_dict(),
        served_file=served.name,
        passed=check is None or check.passed,
        check=check,
        optimization=optimization,
        quantization=quantization,
        override_reason=options.override_reason,
        sandbox=sandbox,
        notes=tuple(notes),
        timings_ms=dict(progress.timings),
        options=options.to_dict(),
    )
    report.write(out_dir / REPORT_FILE)
    return report


def _read_sample(path: Path | None, input_names: list[str], fmt: Format) -> Arrays | None:
    if path is None:
        return None
    if fmt in TABLE_FORMATS:
        # A table has one input whatever the sample calls it.
        arrays = read_sample(path, input_names)
        if len(arrays) == 1:
            return {input_names[0]: next(iter(arrays.values()))}
        return arrays
    return read_sample(path, input_names)


def _runtime_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    return {
        "onnx": str(onnx.__version__),
        "onnxruntime": str(onnxruntime.__version__),
        "numpy": str(numpy.__version__),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployer.convert.job")
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--format", required=True, choices=[f.value for f in Format])
    parser.add_argument("--options", type=Path, required=True)
    parser.add_argument("--sample", type=Path)
    parser.add_argument("--known-answer", type=Path)
    parser.add_argument("--serving-opset", type=int, required=True)
    parser.add_argument("--detected", default="")
    parser.add_argument("--sandbox", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="convert-", dir=args.scratch))
    try:
        options = ConversionOptions.from_dict(json.loads(args.options.read_text()))
        report = run_job(
            source=args.source,
            fmt=Format(args.format),
            options=options,
            out_dir=args.out,
            scratch=scratch,
            serving_opset=args.serving_opset,
            sample_path=args.sample,
            known_answer=args.known_answer,
            detected=args.detected,
            sandbox=args.sandbox,
        )
    except DeployerError as exc:
        write_result(args.result, {"code": exc.code, "message": exc.message})
        return HANDLED_ERROR_EXIT
    except MemoryError:
        print("MemoryError while converting the model", file=sys.stderr)
        return 1
    except Exception as exc:  # the user's model can raise anything; name it, no traceback
        import traceback

        traceback.print_exc()
        write_result(
            args.result,
            {
                "code": "conversion_failed",
                "message": f"The conversion failed: {type(exc).__name__}: {_first_line(exc)}. "
                "If the model loads and runs in your own environment, upload it again with a "
                "sample input; otherwise report this message.",
            },
        )
        return HANDLED_ERROR_EXIT
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_result(args.result, {"passed": report.passed, "served_file": report.served_file})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
