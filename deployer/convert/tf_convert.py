"""Keras 3 (.keras) and TensorFlow SavedModels (an archive of the folder) to ONNX with tf2onnx.

TensorFlow exists only in the ``tensorflow`` converter image, so this module runs only
there. A ``.keras`` file is loaded with Keras's safe mode (no lambda layers' code is
deserialized); a SavedModel's ``serving_default`` signature is what is converted and
what the check runs. Both are converted from a ``tf.function`` with a free batch axis.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deployer.convert.archive import extract_archive
from deployer.convert.formats import Format
from deployer.errors import InvalidModel, InvalidSample
from deployer.samples import Arrays

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
SIGNATURE = "serving_default"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:600]


class TensorflowConverter:
    """Loads a Keras model or a SavedModel, converts it with tf2onnx and runs the original."""

    def __init__(self, path: Path, fmt: Format) -> None:
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
        self.format = fmt
        self._scratch = Path(tempfile.mkdtemp(prefix="tf-"))
        self.output_names: list[str] = []
        try:
            if fmt == Format.KERAS:
                self._load_keras(path)
            else:
                self._load_saved_model(path)
        except (InvalidModel, MemoryError):
            raise
        except Exception as exc:  # TensorFlow and Keras raise many types
            what = "Keras model" if fmt == Format.KERAS else "SavedModel"
            raise InvalidModel(
                f"TensorFlow could not load the {what}: {_first_line(exc)}. If the file was cut "
                "short, upload it again; "
                + (
                    "it must come from model.save('model.keras') (Keras 3)."
                    if fmt == Format.KERAS
                    else "archive the folder tf.saved_model.save wrote (.zip or .tar.gz)."
                ),
                code="load_failed",
            ) from exc

    converter = "tf2onnx.convert.from_function"

    def _load_keras(self, path: Path) -> None:
        import keras

        # Keras tells the format by the name.
        named = self._scratch / "model.keras"
        shutil.copyfile(path, named)
        self.model = keras.saving.load_model(str(named), compile=False, safe_mode=True)
        self.specs = [
            (_clean(t.name, f"input_{i}"), tuple(t.shape), str(t.dtype))
            for i, t in enumerate(self.model.inputs)
        ]
        self.input_names = [name for name, _shape, _dtype in self.specs]

    def _load_saved_model(self, path: Path) -> None:
        import tensorflow as tf

        files, _total = extract_archive(path, self._scratch / "upload")
        found = sorted(
            (self._scratch / "upload" / f).parent
            for f in files
            if os.path.basename(f) == "saved_model.pb"
        )
        if len(found) != 1:
            raise InvalidModel(
                f"The archive must hold one SavedModel folder; it has {len(found)} "
                "saved_model.pb files.",
                code="bad_archive",
            )
        self.model = tf.saved_model.load(str(found[0]))
        signatures = dict(self.model.signatures)
        if SIGNATURE not in signatures:
            raise InvalidModel(
                f"The SavedModel has no {SIGNATURE!r} signature (it has "
                f"{', '.join(signatures) or 'none'}). Save it with "
                "tf.saved_model.save(model, path, signatures=...) naming serving_default.",
                code="no_signature",
            )
        self.signature = signatures[SIGNATURE]
        _args, kwargs = self.signature.structured_input_signature
        self.specs = [
            (name, tuple(spec.shape), spec.dtype.name) for name, spec in sorted(kwargs.items())
        ]
        self.input_names = [name for name, _shape, _dtype in self.specs]
        self.signature_outputs = sorted(self.signature.structured_outputs)

    @property
    def max_opset(self) -> int:
        from tf2onnx import constants

        return int(max(constants.OPSET_TO_IR_VERSION))

    def versions(self) -> dict[str, str]:
        import tensorflow as tf
        import tf2onnx

        found = {"tensorflow": str(tf.__version__), "tf2onnx": str(tf2onnx.__version__)}
        if self.format == Format.KERAS:
            import keras

            found["keras"] = str(keras.__version__)
        return found

    def _call(self, *tensors: Any) -> list[Any]:
        if self.format == Format.KERAS:
            result = self.model(list(tensors) if len(tensors) > 1 else tensors[0], training=False)
            return list(result) if isinstance(result, (list, tuple)) else [result]
        values = self.signature(**dict(zip(self.input_names, tensors, strict=True)))
        return [values[name] for name in self.signature_outputs]

    def export(
        self, target: Path, *, opset: int, dynamic_batch: bool, sample: Arrays | None
    ) -> list[str]:
        import tensorflow as tf
        import tf2onnx

        if sample is not None:
            missing = [n for n in self.input_names if n not in sample]
            if missing:
                raise InvalidSample(
                    f"The sample has no array for {', '.join(missing)}; the model's inputs are "
                    f"{', '.join(self.input_names)}."
                )
        specs = []
        for name, shape, dtype in self.specs:
            dims = list(shape)
            if dims and dynamic_batch:
                dims[0] = None
            if any(d is None for d in dims[1:]) and sample is not None:
                dims[1:] = list(sample[name].shape[1:])
            specs.append(tf.TensorSpec(dims, tf.as_dtype(dtype), name=name))
        function = tf.function(self._call, input_signature=specs)
        try:
            proto, _storage = tf2onnx.convert.from_function(
                function, input_signature=specs, opset=opset
            )
        except Exception as exc:  # tf2onnx names the unsupported op in its message
            raise InvalidModel(
                f"tf2onnx could not convert the model at opset {opset}: {_first_line(exc)}.",
                code="unsupported_operator",
            ) from exc
        count = len(proto.graph.output)
        if self.format == Format.KERAS:
            self.output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
        else:
            self.output_names = list(self.signature_outputs)
        _rename(proto, [i.name for i in proto.graph.input], self.input_names)
        _rename(proto, [o.name for o in proto.graph.output], self.output_names)
        target.write_bytes(proto.SerializeToString())
        return [f"converted the {'Keras model' if self.format == Format.KERAS else SIGNATURE}"]

    def run(self, inputs: Arrays) -> Arrays:
        """The original's outputs on ``inputs``, named like the ONNX outputs."""
        import tensorflow as tf

        tensors = [tf.constant(np.asarray(inputs[name])) for name in self.input_names]
        values = self._call(*tensors)
        return {
            name: np.asarray(value) for name, value in zip(self.output_names, values, strict=True)
        }


def _clean(name: str, fallback: str) -> str:
    cleaned = name.split(":")[0].strip()
    return cleaned or fallback


def _rename(proto: Any, old: list[str], new: list[str]) -> None:
    """Rename graph inputs or outputs (and every use of them) in place."""
    if len(old) != len(new):
        return
    names = {a: b for a, b in zip(old, new, strict=True) if a != b}
    if not names:
        return
    graph = proto.graph
    for node in graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
    for value in list(graph.input) + list(graph.output):
        value.name = names.get(value.name, value.name)
