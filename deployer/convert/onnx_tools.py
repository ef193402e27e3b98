"""onnxruntime helpers for conversion: sessions, signatures, optimization, quantization, opsets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deployer.errors import InvalidModel
from deployer.samples import Arrays

# onnxruntime's optimization level for the saved artifact: EXTENDED fusions run on the
# CPU and CUDA providers alike; ALL adds layouts tied to the CPU it ran on.
SAVED_OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"


def newest_runtime_opset() -> int:
    """The newest ai.onnx opset this onnxruntime has kernels for."""
    from onnxruntime.capi import _pybind_state

    newest = 0
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.domain in ("", "ai.onnx"):
            newest = max(newest, int(kernel.version_range[0]))
    return newest


def session(path: Path, *, optimized: bool = True, threads: int = 1) -> Any:
    """A CPU session; ``optimized=False`` runs the graph as written (the reference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(
            f"onnxruntime {ort.__version__} cannot load the converted model: {text}. The model "
            "probably uses an operator or opset this onnxruntime lacks; try another opset.",
            code="unsupported_operator",
        ) from exc


def run(sess: Any, inputs: Arrays) -> Arrays:
    """Run a session; outputs by name."""
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, inputs)
    return dict(zip(names, values, strict=True))


def uses_external_data(path: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data as tensor_is_external

    proto = onnx.load(str(path), load_external_data=False)
    return any(tensor_is_external(t) for t in proto.graph.initializer)


def optimize(source: Path, target: Path) -> None:
    """Save onnxruntime's graph-optimized form of ``source`` as ``target``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, SAVED_OPTIMIZATION_LEVEL)
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    if uses_external_data(source):
        # Large weights stay in a file beside the model, as in the upload.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{target.name}.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    if not target.is_file():
        raise InvalidModel("onnxruntime did not write the optimized model.", code="optimize_failed")


# Operators whose weights dynamic int8 quantization changes.
QUANTIZABLE_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "Conv",
        "ConvTranspose",
        "LSTM",
        "GRU",
        "Attention",
        "EmbedLayerNormalization",
    }
)


def quantize_dynamic_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the weights (activations quantized at run time)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source), load_external_data=False)
    found = {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")} & QUANTIZABLE_OPS
    if not found:
        raise InvalidModel(
            "the model has no operators that dynamic int8 quantization changes "
            "(MatMul, Gemm, Conv, LSTM, ...), so there is nothing to quantize",
            code="nothing_to_quantize",
        )

    # The quantizer suggests pre-processing on every call; it is advice, not a problem.
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        use_external_data_format=uses_external_data(source),
    )


def opsets_of(path: Path) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.domain or "ai.onnx": int(entry.version) for entry in proto.opset_import}
