"""External data may not leave the model's folder, whichever tensor names it (issue 12.1).

Every hiding place (graph initializer, Constant ``value``/``sparse_value``, a TENSORS
attribute, the bodies of If/Loop/Scan, a model-local function) is refused by the one
check that validation, conversion and the model-image build share; onnxruntime
itself refuses the runnable ones as a second layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deployer.convert.external_data import external_data_check, external_tensors
from deployer.convert.job import _copy_served
from deployer.errors import DeployerError, InvalidModel
from deployer.images import BuildError
from deployer.images.model import external_data_files
from deployer.validate import ValidationRequest, validate_onnx
from tests.deployer import hidden_tensors as ht

PLACES = sorted(ht.HIDING_PLACES)


def _outside_locations(root: Path) -> list[str]:
    return ["../secret.bin", os.path.abspath(root / "secret.bin"), "sub/../../secret.bin"]


@pytest.mark.parametrize("place", PLACES)
def test_every_hiding_place_is_listed(tmp_path: Path, place: str) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    model = ht.HIDING_PLACES[place](folder / "m.onnx", "../secret.bin")
    found = external_tensors(ht.load(model))
    assert [t.location for t in found] == ["../secret.bin"]


@pytest.mark.parametrize("place", PLACES)
def test_the_shared_check_refuses_every_hiding_place(tmp_path: Path, place: str) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    for location in _outside_locations(tmp_path):
        model = ht.HIDING_PLACES[place](folder / "m.onnx", location)
        with pytest.raises(InvalidModel, match="outside the model's own folder") as error:
            external_data_check(ht.load(model), folder)
        assert error.value.code == "external_data_outside"


@pytest.mark.parametrize("place", PLACES)
def test_validation_refuses_every_hiding_place(tmp_path: Path, place: str) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    model = ht.HIDING_PLACES[place](folder / "m.onnx", "../secret.bin")
    with pytest.raises(DeployerError) as error:
        validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))
    assert error.value.code == "external_data_outside"
    assert "../secret.bin" in error.value.message


@pytest.mark.parametrize("place", PLACES)
def test_model_image_build_refuses_every_hiding_place(tmp_path: Path, place: str) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    model = ht.HIDING_PLACES[place](folder / "m.onnx", os.path.abspath(tmp_path / "secret.bin"))
    with pytest.raises(BuildError, match="outside the model's own folder"):
        external_data_files(model)


@pytest.mark.parametrize("place", PLACES)
def test_conversion_output_copy_refuses_every_hiding_place(tmp_path: Path, place: str) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    model = ht.HIDING_PLACES[place](folder / "m.onnx", "../secret.bin")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidModel) as error:
        _copy_served(model, out)
    assert error.value.code == "external_data_outside"
    assert not any(out.iterdir())


def test_a_link_inside_the_folder_that_points_outside_is_refused(tmp_path: Path) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    model = ht.constant_value(folder / "m.onnx", "weights.bin")
    with pytest.raises(InvalidModel) as error:
        external_data_check(ht.load(model), folder)
    assert error.value.code == "external_data_outside"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    folder, _secret = ht.secret_setup(tmp_path)
    model = ht.if_branch(folder / "m.onnx", "not-uploaded.bin")
    with pytest.raises(InvalidModel, match=r"not-uploaded\.bin") as error:
        external_data_check(ht.load(model), folder)
    assert error.value.code == "external_data_missing"


def test_data_inside_the_folder_is_found_everywhere_and_used(tmp_path: Path) -> None:
    folder, secret = ht.secret_setup(tmp_path)
    (folder / "data").mkdir()
    (folder / "data" / "c.bin").write_bytes(secret)
    model = ht.function_body(folder / "m.onnx", "data/c.bin")
    assert external_data_check(ht.load(model), folder) == ["data/c.bin"]
    assert external_data_files(model) == ["data/c.bin"]
    report = validate_onnx(ValidationRequest(model_path=model, work_dir=tmp_path / "work"))
    assert [o.name for o in report.signature.outputs] == ["y", "leak"]


@pytest.mark.parametrize("place", ht.RUNNABLE)
def test_installed_onnxruntime_refuses_outside_data_itself(tmp_path: Path, place: str) -> None:
    """The second layer: the onnxruntime floor in pyproject.toml refuses these on its own.

    onnxruntime 1.23.2 ran the initializer, Constant and function models and returned
    the outside file as ``leak``; 1.24.1 and later refuse all of them.
    """
    folder, secret = ht.secret_setup(tmp_path)
    inside = folder / "inside.bin"
    inside.write_bytes(secret)
    # The same model with its data inside the folder runs and returns the bytes, so
    # the refusal below is about the path, not a broken model.
    good = ht.HIDING_PLACES[place](folder / "good.onnx", "inside.bin")
    leak = ort.InferenceSession(str(good), providers=["CPUExecutionProvider"]).run(
        ["leak"], {"x": np.zeros([1], np.float32)}
    )[0]
    assert leak.tobytes() == secret
    for location in _outside_locations(tmp_path):
        model = ht.HIDING_PLACES[place](folder / "m.onnx", location)
        with pytest.raises(Exception, match=r"(?i)external data|invalid model|escapes"):
            ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
