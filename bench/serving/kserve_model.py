"""KServe's Python model server (``kserve`` package) running one ONNX file with onnxruntime.

Started by ``servers.start_kserve`` in its own venv (bench/.venv-kserve):
``python kserve_model.py --model_name NAME --model_path PATH --http_port P --grpc_port G``.
KServe speaks V2 REST (JSON and the binary tensor extension) and V2 gRPC on its own.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        y = self.session.run(None, {self.input_name: x})[0]
        # Raw/binary answers where the client asked for them (gRPC raw inputs, the REST
        # binary tensor extension's binary_data), as KServe's own predictors do.
        requested = payload.request_outputs or []
        binary = payload.use_binary_outputs or any(o.binary_data for o in requested)
        output = InferOutput(name=self.output_name, shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=binary)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[output],
            from_grpc=payload.from_grpc,
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        enable_docs_url=False,
    ).start([OnnxModel(args.model_name, args.model_path)])
