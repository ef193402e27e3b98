"""Child-process entry point that validates an ONNX model and records its known answer.

Run by ``deployer.validate`` under memory and time limits, never in a worker:

    python -m deployer.onnx_inspect --model M.onnx --out DIR [--sample S] --result R.json

It checks the file with the ONNX checker, loads it in onnxruntime, reads the
signature, runs the model once on the sample (the user's, else generated) and
writes ``known_answer.npz`` into DIR. Handled problems are written to the result
file with a code and a message, and the process exits with status 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from deployer.convert.external_data import external_data_check
from deployer.errors import DeployerError, InvalidModel, InvalidSample, LimitExceeded
from deployer.samples import (
    Arrays,
    generate_sample,
    load_sample,
    sample_candidates,
    save_known_answer,
)
from deployer.sandbox import HANDLED_ERROR_EXIT, write_result
from deployer.serving.batch_axes import BatchAxes, Dims, find_batch_axes
from deployer.signature import Signature, session_signature

KNOWN_ANSWER_FILE = "known_answer.npz"


def inspect_model(model_path: Path, out_dir: Path, sample_path: Path | None) -> dict[str, Any]:
    """Validate the model and write its known answer; return the inspection report."""
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    size = model_path.stat().st_size
    if size == 0:
        raise InvalidModel(
            "The uploaded file is empty (0 bytes). Upload the .onnx file your exporter wrote.",
            code="empty_file",
        )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidModel(
            "The file is not an ONNX model: it could not be parsed as an ONNX protobuf "
            f"({exc}). If it was cut short, upload it again; if it is another format, "
            "export it to ONNX first.",
            code="not_onnx",
        ) from exc
    if not proto.HasField("graph") or proto.ir_version == 0 or not proto.opset_import:
        raise InvalidModel(
            "The file parsed, but it holds no ONNX graph (no IR version, opset or graph). "
            "It is not an ONNX model; export your model with torch.onnx.export, skl2onnx "
            "or tf2onnx and upload the .onnx file.",
            code="not_onnx",
        )
    external_data_check(proto, model_path.parent)
    try:
        onnx.checker.check_model(str(model_path))
    except onnx.checker.ValidationError as exc:
        raise InvalidModel(
            f"The ONNX checker rejected the model: {_first_line(exc)}", code="onnx_check_failed"
        ) from exc
    timings["parse_and_check_ms"] = _ms(started)

    started = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise InvalidModel(
            f"onnxruntime {ort.__version__} could not load the model: {_first_line(exc)}. "
            "Check that the opset and operators are supported by this onnxruntime.",
            code="runtime_load_failed",
        ) from exc
    timings["load_ms"] = _ms(started)

    signature = session_signature(session)
    generated: dict[str, Any] | None = None
    started = time.perf_counter()
    if sample_path is not None:
        inputs = load_sample(sample_path, signature)
        source = "uploaded"
        values = _run(session, inputs, uploaded=True)
    else:
        source = "generated"
        inputs, values, generated = _run_generated(session, signature)
    timings["inference_ms"] = _ms(started)
    outputs = {spec.name: value for spec, value in zip(signature.outputs, values, strict=True)}
    save_known_answer(out_dir / KNOWN_ANSWER_FILE, inputs, outputs)

    return {
        "signature": signature.to_dict(),
        "sample_source": source,
        **({"generated_sample": generated} if generated is not None else {}),
        "sample_shapes": {name: list(array.shape) for name, array in inputs.items()},
        "ir_version": int(proto.ir_version),
        "opsets": {entry.domain or "ai.onnx": int(entry.version) for entry in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "node_count": len(proto.graph.node),
        "parameter_count": int(sum(_numel(t) for t in proto.graph.initializer)),
        "size_bytes": size,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "timings": timings,
    }


def _run(session: Any, inputs: Arrays, *, uploaded: bool) -> list[Any]:
    """Run once; raise a handled error naming what failed."""
    try:
        return list(session.run(None, inputs))
    except Exception as exc:  # onnxruntime's errors carry the operator that failed
        if _allocation_failure(exc):
            raise LimitExceeded(
                "The model tried to allocate more memory than its limit allows while running "
                f"({_first_line(exc)}). Raise MODELPORT_VALIDATION_MEMORY_MB if it really "
                "needs that much.",
                code="out_of_memory",
            ) from exc
        if uploaded:
            raise InvalidSample(
                f"The model failed on the uploaded sample input: {_first_line(exc)}"
            ) from exc
        raise


def _run_generated(session: Any, signature: Signature) -> tuple[Arrays, list[Any], dict[str, Any]]:
    """Try generated inputs of a few sizes until the model runs; say which were tried."""
    found = find_batch_axes(
        [_dims(node) for node in session.get_inputs()],
        [_dims(node) for node in session.get_outputs()],
    )
    axes = found.inputs if isinstance(found, BatchAxes) else {}
    attempts: list[dict[str, Any]] = []
    first_error = ""
    for batch, size in sample_candidates(signature, axes):
        inputs = generate_sample(signature, batch=batch, size=size, batch_axes=axes)
        try:
            values = _run(session, inputs, uploaded=False)
        except LimitExceeded:
            raise
        except Exception as exc:
            first_error = first_error or _first_line(exc)
            attempts.append({"batch": batch, "size": size, "error": _first_line(exc)[:200]})
            continue
        attempts.append({"batch": batch, "size": size, "error": ""})
        report = {"batch": batch, "free_dim_size": size, "batch_axes": axes, "attempts": attempts}
        return inputs, values, report
    tried = ", ".join(f"batch {a['batch']} x {a['size']}" for a in attempts)
    raise InvalidModel(
        f"The model loaded but failed on every generated input tried ({tried}): "
        f"{first_error}. Upload a sample input that the model accepts.",
        code="inference_failed",
    )


def _dims(node: Any) -> Dims:
    dims = list(node.shape or ())
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    return Dims(node.name, shape, tuple(d if isinstance(d, str) else "" for d in dims))


def _numel(tensor: Any) -> int:
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count


def _allocation_failure(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or any(
        marker in text for marker in ("bad_alloc", "Failed to allocate", "out of memory")
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployer.onnx_inspect")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sample", type=Path)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        report = inspect_model(args.model, args.out, args.sample)
    except DeployerError as exc:
        write_result(args.result, {"code": exc.code, "message": exc.message})
        return HANDLED_ERROR_EXIT
    except MemoryError:
        print("MemoryError while inspecting the model", file=sys.stderr)
        return 1
    write_result(args.result, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
