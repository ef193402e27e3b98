"""tritonclient.http (binary tensors on, its default) against the runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from serving_onnx_models import (
    ALL_TYPES,
    LABELS,
    all_types,
    classifier,
    mlp,
    mlp_reference,
    multi_io,
    sample_of,
)


def _client(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")


def test_float_model_metadata_and_binary_infer(start_server, tmp_path: Path) -> None:
    path, layers = mlp(tmp_path / "mlp.onnx")
    server = start_server(path, "mlp")
    client = _client(server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"][0]["name"] == "input"
    assert meta["outputs"][0]["shape"] == [-1, 4]
    config = client.get_model_config("mlp")
    assert config["max_batch_size"] > 1
    assert "dynamic_batching" in config

    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True by default
    result = client.infer("mlp", [inp])
    np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(layers, x), rtol=1e-5)

    # Explicit binary output, and JSON output, both decode to the same numbers.
    for binary in (True, False):
        out = httpclient.InferRequestedOutput("output", binary_data=binary)
        result = client.infer("mlp", [inp], outputs=[out])
        np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(layers, x), rtol=1e-5)
    # JSON input with binary output.
    inp.set_data_from_numpy(x, binary_data=False)
    result = client.infer("mlp", [inp])
    np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(layers, x), rtol=1e-5)

    stats = client.get_inference_statistics("mlp")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 4
    assert stats["inference_count"] == 20


def test_multi_input_multi_output(start_server, tmp_path: Path) -> None:
    server = start_server(multi_io(tmp_path / "multi.onnx"), "multi")
    client = _client(server)
    meta = client.get_model_metadata("multi")
    assert [t["datatype"] for t in meta["inputs"]] == ["FP32", "INT64"]
    assert [t["datatype"] for t in meta["outputs"]] == ["FP32", "FP32", "BOOL"]

    a = np.array([[1, -2, 3, -4], [0.5, 0.5, -9, 2]], dtype=np.float32)
    b = np.array([[1, 1, -5, 2], [3, 0, 1, -7]], dtype=np.int64)
    inputs = [
        httpclient.InferInput("a", [2, 4], "FP32"),
        httpclient.InferInput("b", [2, 4], "INT64"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("multi", inputs)
    np.testing.assert_allclose(result.as_numpy("sum"), a + b)
    np.testing.assert_allclose(result.as_numpy("product"), a * b)
    np.testing.assert_array_equal(result.as_numpy("positive"), (a + b) > 0)

    # Only some outputs, one binary and one JSON.
    result = client.infer(
        "multi",
        inputs,
        outputs=[
            httpclient.InferRequestedOutput("positive", binary_data=False),
            httpclient.InferRequestedOutput("product", binary_data=True),
        ],
    )
    assert result.as_numpy("sum") is None
    np.testing.assert_array_equal(result.as_numpy("positive"), (a + b) > 0)
    np.testing.assert_allclose(result.as_numpy("product"), a * b)


def test_bytes_output_model(start_server, tmp_path: Path) -> None:
    server = start_server(classifier(tmp_path / "cls.onnx"), "cls")
    client = _client(server)
    meta = client.get_model_metadata("cls")
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {
        "label": "BYTES",
        "echo": "BYTES",
    }
    scores = np.array([[0, 1, 0], [5, 0, 0], [0, 0, 2]], dtype=np.float32)
    text = np.array(["héllo".encode(), b"", b"three words here"], dtype=object)
    for binary in (True, False):
        inputs = [
            httpclient.InferInput("scores", [3, 3], "FP32"),
            httpclient.InferInput("text", [3], "BYTES"),
        ]
        inputs[0].set_data_from_numpy(scores, binary_data=binary)
        inputs[1].set_data_from_numpy(text, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("label", binary_data=binary),
            httpclient.InferRequestedOutput("echo", binary_data=binary),
        ]
        result = client.infer("cls", inputs, outputs=outputs)
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert labels == [LABELS[1], LABELS[0], LABELS[2]]
        echo = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("echo")]
        assert echo == list(text)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(start_server, tmp_path: Path, binary: bool) -> None:
    server = start_server(all_types(tmp_path / "types.onnx"), "types")
    client = _client(server)
    inputs = []
    samples = {}
    for index, datatype in enumerate(ALL_TYPES):
        value = sample_of(datatype, rows=3, seed=index)
        samples[datatype] = value
        inp = httpclient.InferInput(f"in_{datatype}", list(value.shape), datatype)
        inp.set_data_from_numpy(value, binary_data=binary)
        inputs.append(inp)
    outputs = [httpclient.InferRequestedOutput(f"out_{d}", binary_data=binary) for d in ALL_TYPES]
    result = client.infer("types", inputs, outputs=outputs)
    for datatype, value in samples.items():
        got = result.as_numpy(f"out_{datatype}")
        assert got.shape == value.shape, datatype
        if datatype == "BYTES":
            got = np.vectorize(lambda v: v if isinstance(v, bytes) else v.encode())(got)
            assert got.tolist() == value.tolist()
        else:
            assert got.dtype == value.dtype, datatype
            np.testing.assert_array_equal(got, value, err_msg=datatype)
