"""Gradient-boosted trees to ONNX: XGBoost (JSON/UBJSON), LightGBM (text), CatBoost (.cbm).

XGBoost and LightGBM go through onnxmltools; CatBoost through its own ONNX export. The
frameworks exist only in the ``trees`` converter image, so this module runs only there.
Classifiers give ``label`` (class index, int64) and ``probabilities`` ([rows, classes]);
regressors one float output. The original framework computes the same outputs on the
same inputs for the check.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deployer.convert.formats import Format
from deployer.errors import InvalidModel, InvalidSample
from deployer.samples import Arrays

Kind = Literal["classifier", "regressor"]
INPUT_NAME = "input"
# CatBoost's ONNX export names its input this way and cannot be told otherwise.
CATBOOST_INPUT = "features"
LABEL, PROBABILITIES = "label", "probabilities"

# Objectives onnxmltools converts faithfully, by the framework's own names.
_XGB_REGRESSION = ("reg:squarederror", "reg:squaredlogerror", "reg:logistic", "reg:absoluteerror")
_XGB_CLASSIFICATION = ("binary:logistic", "multi:softprob", "multi:softmax")
_LGB_REGRESSION = ("regression", "regression_l1", "huber", "fair", "quantile", "mape")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


class TreesConverter:
    """Loads a tree ensemble, converts it to ONNX and runs the original."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.format = fmt
        self.output_names: list[str] = []
        self._scratch = Path(tempfile.mkdtemp(prefix="trees-"))
        try:
            if fmt == Format.XGBOOST:
                self._load_xgboost(path)
            elif fmt == Format.LIGHTGBM:
                self._load_lightgbm(path)
            else:
                self._load_catboost(path)
        except (InvalidModel, MemoryError):
            raise
        except Exception as exc:  # each framework raises its own error types
            raise InvalidModel(
                f"{fmt.value} could not load the model: {_first_line(exc)}. If the file was cut "
                "short, upload it again; it must come from the framework's save_model.",
                code="load_failed",
            ) from exc
        self.input_names = [CATBOOST_INPUT if fmt == Format.CATBOOST else INPUT_NAME]

    # ------------------------------------------------------------ loading

    def _load_xgboost(self, path: Path) -> None:
        import xgboost

        # XGBoost tells JSON from UBJSON by the file name: give it the one the content says.
        with path.open("rb") as handle:
            suffix = ".json" if handle.read(2) == b'{"' else ".ubj"
        named = self._scratch / f"model{suffix}"
        shutil.copyfile(path, named)
        booster = xgboost.Booster()
        booster.load_model(str(named))
        config = json.loads(booster.save_config())
        objective = str(config["learner"]["objective"]["name"])
        if objective in _XGB_CLASSIFICATION:
            self.kind: Kind = "classifier"
            self.model: Any = xgboost.XGBClassifier()
        elif objective in _XGB_REGRESSION:
            self.kind = "regressor"
            self.model = xgboost.XGBRegressor()
        else:
            raise InvalidModel(
                f"The XGBoost objective {objective!r} is not converted to ONNX; ModelPort "
                f"converts {', '.join(_XGB_CLASSIFICATION + _XGB_REGRESSION)}.",
                code="unsupported_operator",
            )
        self.model.load_model(str(named))
        self.objective = objective
        self.features = int(booster.num_features())

    def _load_lightgbm(self, path: Path) -> None:
        import lightgbm

        self.model = lightgbm.Booster(model_file=str(path))
        objective = str(self.model.dump_model(num_iteration=0).get("objective", ""))
        name = objective.split()[0] if objective else ""
        if name in ("binary", "multiclass", "multiclassova"):
            self.kind = "classifier"
        elif name in _LGB_REGRESSION:
            self.kind = "regressor"
        else:
            raise InvalidModel(
                f"The LightGBM objective {objective!r} is not converted to ONNX; ModelPort "
                f"converts binary, multiclass and {', '.join(_LGB_REGRESSION)}.",
                code="unsupported_operator",
            )
        self.objective = objective
        self.features = int(self.model.num_feature())

    def _load_catboost(self, path: Path) -> None:
        import catboost

        self.model = catboost.CatBoost()
        self.model.load_model(str(path), format="cbm")
        if self.model.get_cat_feature_indices():
            raise InvalidModel(
                "The CatBoost model uses categorical features, which CatBoost's ONNX export does "
                "not support. Encode them as numbers before training, or serve it otherwise.",
                code="unsupported_operator",
            )
        loss = str(self.model.get_all_params().get("loss_function", ""))
        classifying = loss in ("Logloss", "CrossEntropy", "MultiClass")
        self.kind = "classifier" if classifying else "regressor"
        self.objective = loss
        self.features = len(self.model.feature_names_ or [])

    # ------------------------------------------------------------ what the job asks

    @property
    def converter(self) -> str:
        if self.format == Format.CATBOOST:
            return "catboost save_model(format='onnx')"
        return f"onnxmltools.convert_{self.format.value}"

    @property
    def max_opset(self) -> int:
        if self.format == Format.CATBOOST:
            return 999  # CatBoost writes its own opset; the report says which
        from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

        return int(get_maximum_opset_supported())

    def versions(self) -> dict[str, str]:
        import importlib

        module = importlib.import_module(self.format.value)
        found = {self.format.value: str(module.__version__)}
        if self.format != Format.CATBOOST:
            import onnxmltools

            found["onnxmltools"] = str(onnxmltools.__version__)
        return found

    def _check_sample(self, sample: Arrays | None) -> None:
        if sample is None:
            return
        array = next(iter(sample.values()))
        if len(sample) != 1 or array.ndim != 2 or array.shape[1] != self.features:
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in sample.items())
            raise InvalidSample(
                f"The model takes one table of {self.features} feature columns "
                f"[rows, {self.features}]; the sample holds {shapes}."
            )

    def export(
        self, target: Path, *, opset: int, dynamic_batch: bool, sample: Arrays | None
    ) -> list[str]:
        self._check_sample(sample)
        notes = [f"{self.kind} ({self.objective}), {self.features} features"]
        try:
            if self.format == Format.CATBOOST:
                notes += self._export_catboost(target)
            else:
                self._export_onnxmltools(target, opset, dynamic_batch)
        except InvalidModel:
            raise
        except Exception as exc:  # the converters raise RuntimeError, NotImplementedError...
            raise InvalidModel(
                f"{self.converter} could not convert the model: {_first_line(exc)}.",
                code="unsupported_operator",
            ) from exc
        import onnx

        proto = onnx.load(str(target), load_external_data=False)
        self.output_names = [o.name for o in proto.graph.output]
        return notes

    def _export_onnxmltools(self, target: Path, opset: int, dynamic_batch: bool) -> None:
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType

        initial = [(INPUT_NAME, FloatTensorType([None if dynamic_batch else 1, self.features]))]
        if self.format == Format.XGBOOST:
            proto = onnxmltools.convert_xgboost(
                self.model, initial_types=initial, target_opset=opset
            )
        else:
            proto = onnxmltools.convert_lightgbm(
                self.model, initial_types=initial, target_opset=opset, zipmap=False
            )
        _rename_outputs(proto, self.kind)
        target.write_bytes(proto.SerializeToString())

    def _export_catboost(self, target: Path) -> list[str]:
        import onnx

        raw = self._scratch / "catboost.onnx"
        self.model.save_model(
            str(raw),
            format="onnx",
            export_parameters={"onnx_domain": "ai.catboost", "onnx_model_version": 1},
        )
        proto = onnx.load(str(raw))
        notes = _drop_zipmap(proto)
        _rename_outputs(proto, self.kind)
        target.write_bytes(proto.SerializeToString())
        return notes

    # ------------------------------------------------------------ the original

    def run(self, inputs: Arrays) -> Arrays:
        """The original framework's outputs on ``inputs``, named like the ONNX outputs."""
        table = np.asarray(next(iter(inputs.values())), dtype=np.float32)
        if self.kind == "regressor":
            return {self.output_names[0]: self._regress(table)}
        probabilities = self._probabilities(table)
        return {
            LABEL: np.argmax(probabilities, axis=1).astype(np.int64)
            if self.format != Format.XGBOOST
            else np.asarray(self.model.predict(table)).astype(np.int64),
            PROBABILITIES: probabilities.astype(np.float32),
        }

    def _regress(self, table: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.format == Format.CATBOOST:
            values = self.model.predict(table, prediction_type="RawFormulaVal")
        else:
            values = self.model.predict(table)
        return np.asarray(values, dtype=np.float32).reshape(-1, 1)

    def _probabilities(self, table: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.format == Format.XGBOOST:
            return np.asarray(self.model.predict_proba(table))
        if self.format == Format.CATBOOST:
            return np.asarray(self.model.predict(table, prediction_type="Probability"))
        values = np.asarray(self.model.predict(table))
        if values.ndim == 1:  # binary: the positive class's probability
            values = np.stack([1.0 - values, values], axis=1)
        return values


def _rename_outputs(proto: Any, kind: Kind) -> None:
    """The same output names for every framework: label and probabilities, or variable.

    A classifier's integer output is its label, its float output the probabilities.
    """
    import onnx

    graph = proto.graph
    names: dict[str, str] = {}
    if kind == "regressor" and len(graph.output) == 1:
        names[graph.output[0].name] = "variable"
    elif kind == "classifier" and len(graph.output) == 2:
        for output in graph.output:
            floating = output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            names[output.name] = PROBABILITIES if floating else LABEL
    if len(set(names.values())) != len(names):
        return
    for node in graph.node:
        node.output[:] = [names.get(o, o) for o in node.output]
        node.input[:] = [names.get(i, i) for i in node.input]
    for output in graph.output:
        output.name = names.get(output.name, output.name)


def _drop_zipmap(proto: Any) -> list[str]:
    """Replace a ZipMap output (a list of maps, which the inference protocol cannot carry)
    with the [rows, classes] tensor that feeds it."""
    import onnx

    graph = proto.graph
    zipmaps = [n for n in graph.node if n.op_type == "ZipMap"]
    if not zipmaps:
        return []
    for node in zipmaps:
        source, result = node.input[0], node.output[0]
        graph.node.remove(node)
        for index, output in enumerate(graph.output):
            if output.name == result:
                graph.output.remove(output)
                graph.output.insert(
                    index,
                    onnx.helper.make_tensor_value_info(
                        source, onnx.TensorProto.FLOAT, [None, None]
                    ),
                )
    return ["probabilities as a [rows, classes] tensor (CatBoost's ZipMap removed)"]
