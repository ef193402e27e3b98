"""Sample inputs: reading the user's, generating them, storing known answers without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deployer.errors import InvalidSample
from deployer.samples import generate_sample, load_known_answer, load_sample, save_known_answer
from deployer.signature import Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(
        TensorSpec("x", "FP32", (-1, 4)),
        TensorSpec("ids", "INT64", (-1, 2)),
    ),
    outputs=(TensorSpec("y", "FP32", (-1, 1)),),
)
ONE_INPUT = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=())


def test_generated_sample_fits_signature() -> None:
    arrays = generate_sample(SIGNATURE, batch=3)
    assert arrays["x"].shape == (3, 4)
    assert arrays["x"].dtype == np.float32
    assert arrays["ids"].shape == (3, 2)
    assert arrays["ids"].dtype == np.int64


def test_npz_sample_is_cast_to_model_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, x=np.ones((2, 4), dtype=np.float64), ids=np.array([[1, 2], [3, 4]]))
    arrays = load_sample(path, SIGNATURE)
    assert arrays["x"].dtype == np.float32
    assert arrays["ids"].tolist() == [[1, 2], [3, 4]]


def test_json_v2_request_and_mapping_and_bare_list(tmp_path: Path) -> None:
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "data": [1, 2, 3, 4]}]}))
    assert load_sample(v2, ONE_INPUT)["x"].tolist() == [[1, 2, 3, 4]]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"x": [[0, 0, 0, 1]]}))
    assert load_sample(mapping, ONE_INPUT)["x"].shape == (1, 4)
    bare = tmp_path / "bare.json"
    bare.write_text("[[5, 6, 7, 8]]")
    assert load_sample(bare, ONE_INPUT)["x"][0, 3] == 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"x": [[1, 2, 3]]}, "size 3 in dimension 1"),
        ({"x": [1, 2, 3, 4]}, "2 dimensions"),
        ({"z": [[1, 2, 3, 4]]}, "missing x; unknown z"),
        ({"x": [["a", "b", "c", "d"]]}, "got strings"),
    ],
)
def test_wrong_samples_name_the_problem(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InvalidSample, match=message):
        load_sample(path, ONE_INPUT)


def test_garbage_and_pickled_samples_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "g.bin"
    garbage.write_bytes(b"\x00\x01not json")
    with pytest.raises(InvalidSample, match=r"not \.npy, \.npz or valid JSON"):
        load_sample(garbage, ONE_INPUT)
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidSample, match="without unpickling"):
        load_sample(pickled, ONE_INPUT)


def test_known_answer_round_trip_keeps_strings_without_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ka.npz"
    inputs = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    outputs = {"label": np.array(["cat", "dog"], dtype=object)}
    save_known_answer(path, inputs, outputs)
    got_in, got_out = load_known_answer(path)
    assert got_in["x"].tolist() == [[0, 1, 2, 3]]
    assert got_out["label"].tolist() == ["cat", "dog"]
