"""An MLflow pyfunc that runs an ONNX file with onnxruntime (what `mlflow models serve` serves)."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class OnnxPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import onnxruntime as ort

        self.session = ort.InferenceSession(context.artifacts["onnx"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]
