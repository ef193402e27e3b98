"""Every kind of bad request gets a 4xx with {"error": ...}, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from serving_onnx_models import classifier, mlp

GOOD = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp(tmp_path_factory.mktemp("err") / "mlp.onnx")[0]


@pytest.fixture
def server(start_server, model_path):
    return start_server(model_path, "m", "--max-body-bytes", "20000")


def _binary_body(header: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def _assert_error(status: int, data: bytes, want_status: int, fragment: str) -> None:
    assert status == want_status, data
    doc = json.loads(data)
    assert set(doc) == {"error"} or "error" in doc
    assert fragment.lower() in doc["error"].lower(), doc["error"]


def _still_serves(server) -> None:
    status, answer = server.json("POST", "/v2/models/m/infer", GOOD)
    assert status == 200, answer
    assert answer["outputs"][0]["shape"] == [1, 4]


def _input(**changes) -> dict:
    entry = {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
    entry.update(changes)
    return {"inputs": [entry]}


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (_input(name="nope"), "unexpected input 'nope'"),
        (_input(shape=[1, 15], data=[0.5] * 15), "shape"),
        (_input(shape=[16]), "shape"),
        (_input(shape=[1, 16], data=[0.5] * 15), "elements"),
        (_input(datatype="INT64", data=[1] * 16), "datatype"),
        (_input(datatype="FLOAT32"), "unknown datatype"),
        (_input(data=["x"] * 16), "not a valid FP32"),
        (_input(data=None, parameters={}), "neither"),
        (_input(shape="1,16"), "shape"),
        ({"inputs": []}, "inputs"),
        ({"input": GOOD["inputs"]}, "inputs"),
        ([1, 2], "object"),
        ({"inputs": GOOD["inputs"] * 2}, "twice"),
        ({**GOOD, "outputs": [{"name": "missing"}]}, "unknown output"),
        ({**GOOD, "parameters": {"binary_data_output": "yes"}}, "true or false"),
    ],
)
def test_bad_json_requests_are_400(server, doc, fragment: str) -> None:
    if doc.get("inputs") if isinstance(doc, dict) else False:
        for entry in doc["inputs"]:
            if entry.get("data", 0) is None:
                del entry["data"]
    status, _, data = server.request("POST", "/v2/models/m/infer", json.dumps(doc))
    _assert_error(status, data, 400, fragment)
    _still_serves(server)


def test_invalid_json_is_400(server) -> None:
    status, _, data = server.request("POST", "/v2/models/m/infer", b'{"inputs": [')
    _assert_error(status, data, 400, "not valid JSON")
    status, _, data = server.request("POST", "/v2/models/m/infer", b"\xff\xfe")
    _assert_error(status, data, 400, "not valid JSON")
    status, _, data = server.request("POST", "/v2/models/m/infer", b"")
    _assert_error(status, data, 400, "not valid JSON")
    _still_serves(server)


def test_malformed_binary_headers_are_400(server) -> None:
    raw = np.zeros((1, 16), dtype=np.float32).tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 16],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    body, headers = _binary_body(header, [raw])
    status, _, data = server.request("POST", "/v2/models/m/infer", body, headers)
    assert status == 200, data

    # Header length past the end of the body.
    status, _, data = server.request(
        "POST", "/v2/models/m/infer", body, {"Inference-Header-Content-Length": "99999"}
    )
    _assert_error(status, data, 400, "Inference-Header-Content-Length")
    # Not a number.
    status, _, data = server.request(
        "POST", "/v2/models/m/infer", body, {"Inference-Header-Content-Length": "ten"}
    )
    _assert_error(status, data, 400, "not a number")
    # Header length cutting the JSON short.
    status, _, data = server.request(
        "POST", "/v2/models/m/infer", body, {"Inference-Header-Content-Length": "10"}
    )
    _assert_error(status, data, 400, "not valid JSON")
    # binary_data_size larger than the data sent.
    short_body, short_headers = _binary_body(header, [raw[:-4]])
    status, _, data = server.request("POST", "/v2/models/m/infer", short_body, short_headers)
    _assert_error(status, data, 400, "past the end")
    # Bytes no input claims.
    long_body, long_headers = _binary_body(header, [raw, b"\0\0\0\0"])
    status, _, data = server.request("POST", "/v2/models/m/infer", long_body, long_headers)
    _assert_error(status, data, 400, "no input claims")
    # binary_data_size that is wrong for the shape.
    header["inputs"][0]["parameters"]["binary_data_size"] = len(raw) - 4
    wrong_body, wrong_headers = _binary_body(header, [raw[:-4]])
    status, _, data = server.request("POST", "/v2/models/m/infer", wrong_body, wrong_headers)
    _assert_error(status, data, 400, "needs 64")
    header["inputs"][0]["parameters"]["binary_data_size"] = -1
    neg_body, neg_headers = _binary_body(header, [raw])
    status, _, data = server.request("POST", "/v2/models/m/infer", neg_body, neg_headers)
    _assert_error(status, data, 400, "binary_data_size")
    _still_serves(server)


def test_malformed_bytes_elements_are_400(start_server, tmp_path: Path) -> None:
    server = start_server(classifier(tmp_path / "cls.onnx"), "cls")
    scores = np.zeros((1, 3), dtype=np.float32).tobytes()
    text = struct.pack("<I", 50) + b"short"  # the length prefix claims more than is there
    header = {
        "inputs": [
            {
                "name": "scores",
                "shape": [1, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(scores)},
            },
            {
                "name": "text",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(text)},
            },
        ]
    }
    body, headers = _binary_body(header, [scores, text])
    status, _, data = server.request("POST", "/v2/models/cls/infer", body, headers)
    _assert_error(status, data, 400, "BYTES")
    good_text = struct.pack("<I", 2) + b"ok"
    header["inputs"][1]["parameters"]["binary_data_size"] = len(good_text)
    body, headers = _binary_body(header, [scores, good_text])
    status, _, data = server.request("POST", "/v2/models/cls/infer", body, headers)
    assert status == 200, data


def test_oversized_body_is_413(server) -> None:
    big = {
        "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 9000}]
    }
    status, headers, data = server.request("POST", "/v2/models/m/infer", json.dumps(big))
    _assert_error(status, data, 413, "over the limit")
    assert headers.get("connection") == "close"
    _still_serves(server)


def test_oversized_chunked_body_is_413(server) -> None:
    chunk = b"x" * 8000
    request = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    request += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3 + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    _still_serves(server)


def test_malformed_http_is_400_and_server_survives(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b'"error"' in reply
    _still_serves(server)


def test_gzip_request_body(server) -> None:
    import gzip

    body = gzip.compress(json.dumps(GOOD).encode())
    status, _, data = server.request(
        "POST", "/v2/models/m/infer", body, {"Content-Encoding": "gzip"}
    )
    assert status == 200, data
    status, _, data = server.request(
        "POST", "/v2/models/m/infer", b"not gzip", {"Content-Encoding": "gzip"}
    )
    _assert_error(status, data, 400, "decompress")
    status, _, data = server.request(
        "POST", "/v2/models/m/infer", b"{}", {"Content-Encoding": "br"}
    )
    _assert_error(status, data, 400, "Content-Encoding")


def test_pipelined_requests_are_answered_in_order(server) -> None:
    bodies = []
    for value in (1.0, -1.0, 2.0):
        doc = {"id": str(value), **_input(data=[value] * 16)}
        bodies.append(json.dumps(doc).encode())
    request = b"".join(
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
        for body in bodies
    )
    request += b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.count(b"HTTP/1.1 200 OK") == 4
    ids = [part.split(b'"')[0] for part in reply.split(b'"id":"')[1:]]
    assert ids == [b"1.0", b"-1.0", b"2.0"]
    assert reply.endswith(b'{"live":true}')
