"""scikit-learn to ONNX with skl2onnx: estimators and pipelines from skops, pickle or joblib.

skops files load without running code from the file (only types on an allowlist
are built); pickle and joblib files run code while loading, so this module only
ever runs inside the sandbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deployer.convert.formats import Format
from deployer.errors import InvalidModel, InvalidSample
from deployer.samples import Arrays
from deployer.signature import Signature, TensorSpec

INPUT_NAME = "input"
# Types a skops file may build: scikit-learn's own, and the numeric libraries under it.
SKOPS_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.", "collections.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


class SklearnConverter:
    """Loads an estimator, converts it with skl2onnx and runs the original."""

    input_names = [INPUT_NAME]

    def __init__(self, path: Path, fmt: Format) -> None:
        self.format = fmt
        self.estimator = self._load(path, fmt)
        from sklearn.base import BaseEstimator

        if not isinstance(self.estimator, BaseEstimator):
            raise InvalidModel(
                f"The file holds a {type(self.estimator).__module__}."
                f"{type(self.estimator).__qualname__}, not a scikit-learn estimator or pipeline. "
                "Save the fitted estimator itself (skops.io.dump(model, 'model.skops')).",
                code="not_an_estimator",
            )
        self.output_names: list[str] = []
        self.max_opset = self._max_opset()

    converter = "skl2onnx.to_onnx"

    @staticmethod
    def _load(path: Path, fmt: Format) -> Any:
        if fmt == Format.SKOPS:
            import skops.io

            try:
                untrusted = skops.io.get_untrusted_types(file=str(path))
            except Exception as exc:  # a damaged zip or schema
                raise InvalidModel(
                    f"The .skops file cannot be read: {_first_line(exc)}. Upload it again.",
                    code="load_failed",
                ) from exc
            refused = [t for t in untrusted if not t.startswith(SKOPS_TRUSTED_PREFIXES)]
            if refused:
                raise InvalidModel(
                    "The .skops file builds types outside scikit-learn, NumPy and SciPy "
                    f"({', '.join(refused[:5])}), which ModelPort does not load. Use only "
                    "scikit-learn estimators in the saved pipeline.",
                    code="untrusted_types",
                )
            try:
                return skops.io.load(str(path), trusted=untrusted)
            except MemoryError:
                raise
            except Exception as exc:
                raise InvalidModel(
                    f"skops could not load the file: {_first_line(exc)}. It may come from another "
                    "scikit-learn version; save it again with this one.",
                    code="load_failed",
                ) from exc
        import joblib

        try:
            return joblib.load(str(path))
        except MemoryError:
            raise
        except Exception as exc:  # unpickling raises anything the file's classes raise
            raise InvalidModel(
                f"The pickle could not be loaded: {_first_line(exc)}. If it was cut short, upload "
                "it again; if it comes from another scikit-learn version, save it again with "
                "this one (or use skops).",
                code="load_failed",
            ) from exc

    @staticmethod
    def _max_opset() -> int:
        import skl2onnx

        return int(skl2onnx.__max_supported_opset__)

    def versions(self) -> dict[str, str]:
        import skl2onnx
        import sklearn

        found = {"scikit-learn": str(sklearn.__version__), "skl2onnx": str(skl2onnx.__version__)}
        if self.format == Format.SKOPS:
            import skops

            found["skops"] = str(skops.__version__)
        return found

    @property
    def final_estimator(self) -> Any:
        from sklearn.pipeline import Pipeline

        estimator = self.estimator
        while isinstance(estimator, Pipeline):
            estimator = estimator.steps[-1][1]
        return estimator

    def input_signature(self, sample: Arrays | None, *, dynamic_batch: bool) -> Signature:
        """One input tensor [batch, features], typed by the sample when there is one."""
        if sample is not None:
            if len(sample) != 1:
                raise InvalidSample(
                    "A scikit-learn model takes one input table; the sample holds "
                    f"{len(sample)} arrays ({', '.join(sample)})."
                )
            array = next(iter(sample.values()))
            if array.ndim != 2:
                raise InvalidSample(
                    "The sample must be a 2-D table (rows x features), got shape "
                    f"{list(array.shape)}."
                )
            # Numbers (JSON gives float64 or int64) go in as float32, as skl2onnx's
            # converters expect; only string columns change the input type.
            datatype = "BYTES" if array.dtype.kind in "USO" else "FP32"
            features = int(array.shape[1])
        else:
            declared = getattr(self.estimator, "n_features_in_", None)
            if declared is None:
                raise InvalidSample(
                    "The estimator does not record how many features it takes; upload a sample "
                    "input (a few rows) with the model.",
                    code="sample_required",
                )
            datatype = "FP32"
            features = int(declared)
        return Signature(
            inputs=(TensorSpec(name=INPUT_NAME, datatype=datatype, shape=(-1, int(features))),)
        )

    def export(
        self, target: Path, *, opset: int, dynamic_batch: bool, sample: Arrays | None
    ) -> list[str]:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import (
            DoubleTensorType,
            FloatTensorType,
            Int64TensorType,
            StringTensorType,
        )

        spec = self.input_signature(sample, dynamic_batch=dynamic_batch).inputs[0]
        tensor_type = {
            "FP32": FloatTensorType,
            "FP64": DoubleTensorType,
            "INT64": Int64TensorType,
            "BYTES": StringTensorType,
        }[spec.datatype]
        batch = None if dynamic_batch else 1
        options: dict[int, dict[str, Any]] = {}
        if _is_classifier(self.final_estimator):
            # Probabilities as a plain [batch, classes] tensor instead of a list of maps,
            # which the inference protocol cannot carry; labels stay as they were (strings too).
            options[id(self.final_estimator)] = {"zipmap": False}
        try:
            proto = to_onnx(
                self.estimator,
                initial_types=[(INPUT_NAME, tensor_type([batch, spec.shape[1]]))],
                target_opset=opset,
                options=options or None,
            )
        except Exception as exc:  # skl2onnx raises RuntimeError/NotImplementedError and more
            raise InvalidModel(
                f"skl2onnx could not convert {type(self.final_estimator).__name__}: "
                f"{_first_line(exc)}. Only estimators skl2onnx supports can be converted; "
                "replace the unsupported step or export the model to ONNX yourself.",
                code="unsupported_operator",
            ) from exc
        target.write_bytes(proto.SerializeToString())
        self.output_names = [o.name for o in proto.graph.output]
        return []

    def run(self, inputs: Arrays) -> Arrays:
        """The original's outputs, named like skl2onnx names them."""
        table = inputs[INPUT_NAME]
        final = self.final_estimator
        results: Arrays = {}
        for name in self.output_names:
            value = self._output(name, table, final)
            if value is not None:
                results[name] = np.asarray(value)
        return results

    def _output(self, name: str, table: np.ndarray[Any, Any], final: Any) -> Any:
        estimator = self.estimator
        if name in ("label", "output_label"):
            return estimator.predict(table)
        if name in ("probabilities", "output_probability"):
            if hasattr(final, "predict_proba"):
                try:
                    return estimator.predict_proba(table)
                except AttributeError:
                    pass
            return estimator.decision_function(table)
        if name == "variable":
            if hasattr(estimator, "predict"):
                return estimator.predict(table)
            return estimator.transform(table)
        if name == "scores" and hasattr(estimator, "transform"):
            return estimator.transform(table)
        return None


def _is_classifier(estimator: Any) -> bool:
    from sklearn.base import is_classifier

    return bool(is_classifier(estimator))
