"""A BentoML 1.4 service that runs one ONNX file with onnxruntime.

Started by ``servers.start_bentoml`` in its own venv (bench/.venv-bentoml) with
``bentoml serve bento_service:OnnxService --port P``; the file comes from ``BENCH_ONNX``.
BentoML has no V2 protocol: its API is JSON ``{"x": [[...]]}`` on ``POST /predict`` and
answers a JSON list; it has no gRPC in 1.4 (removed), so it takes part in REST JSON only.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(
    # BentoML's guidance for CPU models: one worker per core (the machine has two).
    workers=int(os.environ.get("BENCH_BENTO_WORKERS", "2")),
    traffic={"timeout": 30},
)
class OnnxService:
    def __init__(self) -> None:
        self.session = ort.InferenceSession(os.environ["BENCH_ONNX"])
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(np.float32, copy=False)})[0]
