"""gRPC (inference.GRPCInferenceService) with tritonclient.grpc and the runtime's own messages."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving_onnx_models import (
    ALL_TYPES,
    LABELS,
    all_types,
    classifier,
    identity,
    mlp,
    mlp_reference,
    multi_io,
    sample_of,
)
from tritonclient.utils import InferenceServerException

from deployer.serving.proto import load


def _client(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")


def test_proto_matches_the_wire_format_tritonclient_speaks() -> None:
    """Every field of our .proto has the number and type tritonclient's compiled copy has."""
    from tritonclient.grpc import service_pb2

    ours = load()

    def fields(descriptor, prefix=""):
        found = {
            f"{prefix}{descriptor.name}.{f.name}": (f.number, f.type, f.is_repeated)
            for f in descriptor.fields
        }
        for nested in descriptor.nested_types:
            found.update(fields(nested, f"{prefix}{descriptor.name}."))
        return found

    ours_fields: dict = {}
    theirs_fields: dict = {}
    for name, descriptor in ours.DESCRIPTOR.message_types_by_name.items():
        ours_fields.update(fields(descriptor))
        theirs_fields.update(fields(service_pb2.DESCRIPTOR.message_types_by_name[name]))
    assert len(ours_fields) > 60
    for field, signature in ours_fields.items():
        assert theirs_fields.get(field) == signature, field
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {m.name for m in service.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }


def test_float_model(start_server, tmp_path: Path) -> None:
    path, layers = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp", "--model-version", "3", grpc=True)
    client = _client(server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "3")
    with pytest.raises(InferenceServerException):
        client.is_model_ready("mlp", "4")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "modelport"
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("mlp", as_json=True)
    assert model["versions"] == ["3"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "16"]}]

    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    inp = grpcclient.InferInput("input", [4, 16], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp], request_id="r1")
    np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(layers, x), rtol=1e-5)
    response = result.get_response()
    assert response.id == "r1"
    assert response.model_version == "3"


def test_multi_input_multi_output(start_server, tmp_path: Path) -> None:
    server = start_server(multi_io(tmp_path / "multi.onnx"), "multi", grpc=True)
    client = _client(server)
    a = np.array([[1, -2, 3, -4]], dtype=np.float32)
    b = np.array([[2, 2, -9, 9]], dtype=np.int64)
    inputs = [
        grpcclient.InferInput("a", [1, 4], "FP32"),
        grpcclient.InferInput("b", [1, 4], "INT64"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("multi", inputs)
    np.testing.assert_allclose(result.as_numpy("sum"), a + b)
    np.testing.assert_allclose(result.as_numpy("product"), a * b)
    np.testing.assert_array_equal(result.as_numpy("positive"), (a + b) > 0)
    only = client.infer("multi", inputs, outputs=[grpcclient.InferRequestedOutput("positive")])
    assert only.as_numpy("sum") is None
    np.testing.assert_array_equal(only.as_numpy("positive"), (a + b) > 0)


def test_bytes_output_model(start_server, tmp_path: Path) -> None:
    server = start_server(classifier(tmp_path / "cls.onnx"), "cls", grpc=True)
    client = _client(server)
    outputs = client.get_model_metadata("cls", as_json=True)["outputs"]
    assert [o["datatype"] for o in outputs] == ["BYTES", "BYTES"]
    scores = np.array([[0, 0, 1], [1, 0, 0]], dtype=np.float32)
    text = np.array(["ünïcode".encode(), b"x"], dtype=object)
    inputs = [
        grpcclient.InferInput("scores", [2, 3], "FP32"),
        grpcclient.InferInput("text", [2], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(scores)
    inputs[1].set_data_from_numpy(text)
    result = client.infer("cls", inputs)
    assert [v.decode() for v in result.as_numpy("label")] == [LABELS[2], LABELS[0]]
    assert list(result.as_numpy("echo")) == list(text)


def test_every_datatype_raw(start_server, tmp_path: Path) -> None:
    server = start_server(all_types(tmp_path / "types.onnx"), "types", grpc=True)
    client = _client(server)
    inputs = []
    samples = {}
    for index, datatype in enumerate(ALL_TYPES):
        value = sample_of(datatype, rows=2, seed=index)
        samples[datatype] = value
        inp = grpcclient.InferInput(f"in_{datatype}", list(value.shape), datatype)
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    result = client.infer("types", inputs)
    for datatype, value in samples.items():
        got = result.as_numpy(f"out_{datatype}")
        if datatype == "BYTES":
            assert got.tolist() == value.tolist()
        else:
            assert got.dtype == value.dtype, datatype
            np.testing.assert_array_equal(got, value, err_msg=datatype)


def test_typed_contents_instead_of_raw(start_server, tmp_path: Path) -> None:
    """Clients may send InferTensorContents rather than raw_input_contents."""
    server = start_server(multi_io(tmp_path / "multi.onnx"), "multi", grpc=True)
    pb = load()
    request = pb.ModelInferRequest(model_name="multi")
    a = request.inputs.add(name="a", datatype="FP32", shape=[1, 4])
    a.contents.fp32_contents.extend([1.0, 2.0, -3.0, 0.5])
    b = request.inputs.add(name="b", datatype="INT64", shape=[1, 4])
    b.contents.int64_contents.extend([1, -5, 1, 1])
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = infer(request, timeout=10)
        names = [o.name for o in response.outputs]
        total = np.frombuffer(response.raw_output_contents[names.index("sum")], dtype="<f4")
        np.testing.assert_allclose(total, [2.0, -3.0, -2.0, 1.5])
        # A wrong element count in typed contents is INVALID_ARGUMENT.
        del a.contents.fp32_contents[-1]
        with pytest.raises(grpc.RpcError) as caught:
            infer(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("model", "NOT_FOUND"),
        ("shape", "INVALID_ARGUMENT"),
        ("dtype", "INVALID_ARGUMENT"),
        ("name", "INVALID_ARGUMENT"),
        ("output", "INVALID_ARGUMENT"),
    ],
)
def test_bad_requests_get_error_codes(start_server, tmp_path: Path, change: str, code: str) -> None:
    path, _ = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp", grpc=True)
    client = _client(server)
    model = "other" if change == "model" else "mlp"
    shape = [1, 15] if change == "shape" else [1, 16]
    datatype = "FP64" if change == "dtype" else "FP32"
    name = "nope" if change == "name" else "input"
    inp = grpcclient.InferInput(name, shape, datatype)
    inp.set_data_from_numpy(np.zeros(shape, dtype=np.float64 if change == "dtype" else np.float32))
    outputs = [grpcclient.InferRequestedOutput("nope")] if change == "output" else None
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [inp], outputs=outputs)
    assert caught.value.status() == f"StatusCode.{code}"
    good = grpcclient.InferInput("input", [1, 16], "FP32")
    good.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    assert client.infer("mlp", [good]).as_numpy("output").shape == (1, 4)


def test_large_tensors_cross_flow_control_windows(start_server, tmp_path: Path) -> None:
    """1.6 MB each way: more than the 64 KiB default HTTP/2 windows and frame sizes."""
    width = 100_000
    server = start_server(identity(tmp_path / "id.onnx", width=width), "id", grpc=True)
    client = _client(server)
    x = np.random.default_rng(5).standard_normal((4, width)).astype(np.float32)
    inp = grpcclient.InferInput("x", [4, width], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        np.testing.assert_array_equal(client.infer("id", [inp]).as_numpy("y"), x)


def test_gzip_compressed_calls_and_unknown_method(start_server, tmp_path: Path) -> None:
    server = start_server(multi_io(tmp_path / "m.onnx"), "m", grpc=True)
    pb = load()
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype in (("a", "FP32"), ("b", "INT64")):
        request.inputs.add(name=name, datatype=datatype, shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), dtype="<f4").tobytes())
    request.raw_input_contents.append(np.full((1, 4), 2, dtype="<i8").tobytes())
    with grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}", compression=grpc.Compression.Gzip
    ) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = infer(request, timeout=10)
        assert np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist() == [3.0] * 4
        missing = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelConfig",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            missing(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_oversized_message_is_refused(start_server, tmp_path: Path) -> None:
    width = 100_000
    server = start_server(
        identity(tmp_path / "id.onnx", width=width),
        "id",
        "--max-body-bytes",
        "100000",
        grpc=True,
    )
    client = _client(server)
    inp = grpcclient.InferInput("x", [1, width], "FP32")
    inp.set_data_from_numpy(np.zeros((1, width), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("id", [inp])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live()
