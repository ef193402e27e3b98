"""PyTorch state_dict archives: the module's source runs only in the converter container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.convert.formats import Format, UnsupportedFormat, detect, resolve
from deployer.convert.runner import ConversionRefused, choose_sandbox
from deployer.errors import DeployerError
from deployer.sandbox import Limits
from tests.conftest import require_module
from tests.deployer.convert import state_dict_models as sd
from tests.deployer.convert.test_convert_container import convert_in_container


def test_state_dict_archives_are_detected_and_a_bare_pth_gets_directions(tmp_path: Path) -> None:
    require_module("torch")
    sd.state_dict_zip(tmp_path / "upload.bin")
    sd.state_dict_tar_gz(tmp_path / "upload.tgz")
    assert detect(tmp_path / "upload.bin").format == Format.TORCH_STATE_DICT
    assert resolve(tmp_path / "upload.tgz").format == Format.TORCH_STATE_DICT
    (tmp_path / "weights.pth").write_bytes(sd.weights_bytes(sd.build_module()))
    with pytest.raises(UnsupportedFormat, match=r"modelport\.json naming the class"):
        detect(tmp_path / "weights.pth")


def test_state_dict_is_refused_without_a_container_even_when_trusted() -> None:
    for trusted in (False, True):
        with pytest.raises(ConversionRefused, match="runs the uploaded Python source"):
            choose_sandbox(
                Format.TORCH_STATE_DICT, container=None, limits=Limits(), trusted_local=trusted
            )


def test_state_dict_with_its_source_converts_in_the_container(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    import onnxruntime as ort
    import torch

    require_module("torch")
    net = sd.state_dict_zip(tmp_path / "model.zip")
    np.save(tmp_path / "x.npy", sd.sample())
    outcome = convert_in_container(
        docker_engine, converter_image, tmp_path, tmp_path / "model.zip", sample=tmp_path / "x.npy"
    )
    report = outcome.report
    assert report.source_format == "torch_state_dict"
    assert report.sandbox == "container"
    assert report.passed, report.check
    assert report.check is not None
    assert report.check.inputs_source == "uploaded"
    assert "rebuilt Net from its source and state_dict" in report.notes
    # The served model computes what the module with these weights computes, any batch.
    rows = sd.sample(9)
    session = ort.InferenceSession(str(outcome.model_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: rows})
    with torch.no_grad():
        want = net(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_state_dict_with_declared_inputs_needs_no_sample(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    require_module("torch")
    sd.state_dict_tar_gz(tmp_path / "model.tar.gz")
    outcome = convert_in_container(
        docker_engine, converter_image, tmp_path, tmp_path / "model.tar.gz"
    )
    assert outcome.report.passed
    assert outcome.report.check is not None
    assert outcome.report.check.inputs_source == "generated"
    assert outcome.report.dynamic_batch is True


def test_weights_that_do_not_fit_the_constructor_are_named(
    docker_engine: Any, converter_image: str, tmp_path: Path
) -> None:
    require_module("torch")
    # Trained with hidden=12; the manifest says 7.
    manifest = {"module": "net.py", "class": "Net", "kwargs": {"features": 5, "hidden": 7}}
    sd.state_dict_zip(tmp_path / "model.zip", manifest=manifest)
    np.save(tmp_path / "x.npy", sd.sample())
    with pytest.raises(DeployerError) as error:
        convert_in_container(
            docker_engine,
            converter_image,
            tmp_path,
            tmp_path / "model.zip",
            sample=tmp_path / "x.npy",
        )
    assert error.value.code == "weights_mismatch"
    assert "kwargs in modelport.json" in error.value.message
    # And a manifest naming a class the source lacks.
    sd.state_dict_zip(tmp_path / "other.zip", manifest={"module": "net.py", "class": "Missing"})
    with pytest.raises(DeployerError, match=r"no torch\.nn\.Module named 'Missing'"):
        convert_in_container(
            docker_engine,
            converter_image,
            tmp_path / "o",
            tmp_path / "other.zip",
            sample=tmp_path / "x.npy",
        )
