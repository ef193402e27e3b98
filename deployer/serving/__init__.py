"""ModelPort's serving runtime: one ONNX model over the Open Inference Protocol (V2).

REST (with the binary tensor data, model configuration and statistics extensions) on
httptools, gRPC (`inference.GRPCInferenceService`) on grpc.aio, dynamic batching into
onnxruntime, Prometheus metrics on a separate port. Run it with
`python -m deployer.serving --model model.onnx --model-name NAME`.

This package imports only the standard library, numpy, onnxruntime, httptools, uvloop
(optional), grpcio, protobuf and prometheus_client, so it can be copied alone into an image.
"""
