"""PyTriton (Triton Inference Server with its Python backend) serving one ONNX file.

``python pytriton_model.py NAME PATH HTTP_PORT GRPC_PORT``, from bench/.venv-pytriton.
Triton batches on its own (dynamic batching, max batch 64) and speaks V2 REST and gRPC.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

name, path, http_port, grpc_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
session = ort.InferenceSession(path)
input_meta, output_meta = session.get_inputs()[0], session.get_outputs()[0]


@batch
def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
    x = inputs[input_meta.name].astype(np.float32, copy=False)
    return {output_meta.name: session.run(None, {input_meta.name: x})[0]}


config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_port=grpc_port)
with Triton(config=config) as triton:
    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name=input_meta.name, dtype=np.float32, shape=tuple(input_meta.shape[1:]))],
        outputs=[Tensor(name=output_meta.name, dtype=np.float32, shape=(-1,))],
        config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher()),
    )
    triton.serve()
