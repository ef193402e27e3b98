"""Keras 3 (.keras) and TensorFlow SavedModels (archived): converted with tf2onnx only in
the tensorflow converter container, checked against TensorFlow itself."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.convert.formats import TENSORFLOW_FORMATS, Format, resolve
from deployer.convert.runner import ConversionRefused, choose_sandbox
from deployer.sandbox import Limits
from tests.deployer.convert.test_convert_container import convert_in_container
from tests.deployer.convert.tf_models import FEATURES


def test_tensorflow_formats_are_refused_without_a_container() -> None:
    for fmt in TENSORFLOW_FORMATS:
        with pytest.raises(ConversionRefused, match="'tensorflow' converter image"):
            choose_sandbox(fmt, container=None, limits=Limits(), trusted_local=True)


def test_keras_and_savedmodel_files_are_detected_by_content(
    tf_models: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copyfile(tf_models["model.keras"], tmp_path / "upload.zip")
    assert resolve(tmp_path / "upload.zip").format == Format.KERAS
    assert resolve(tf_models["saved.tar.gz"]).format == Format.TF_SAVED_MODEL


def test_keras_model_converts_in_the_container_with_the_check(
    docker_engine: Any, tensorflow_image: str, tf_models: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    outcome = convert_in_container(
        docker_engine,
        tensorflow_image,
        tmp_path,
        tf_models["model.keras"],
        sample=tf_models["sample.npy"],
    )
    report = outcome.report
    assert report.source_format == "keras"
    assert report.passed, report.check
    assert report.check is not None
    assert report.check.inputs_source == "uploaded"
    assert {"tensorflow", "keras", "tf2onnx"} <= set(report.versions)
    (only,) = report.check.outputs
    assert only.name == "output"
    assert only.max_abs_diff is not None
    assert only.max_abs_diff < 1e-5
    session = ort.InferenceSession(str(outcome.model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    rows = np.random.default_rng(4).normal(size=(6, FEATURES)).astype(np.float32)
    (probabilities,) = session.run(None, {"features": rows})
    assert probabilities.shape == (6, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_savedmodel_archive_converts_its_serving_signature(
    docker_engine: Any, tensorflow_image: str, tf_models: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    outcome = convert_in_container(
        docker_engine, tensorflow_image, tmp_path, tf_models["saved.tar.gz"]
    )
    report = outcome.report
    assert report.source_format == "tf_saved_model"
    assert report.passed, report.check
    assert report.check is not None
    assert report.check.inputs_source == "generated"
    assert {o.name for o in report.check.outputs} == {"scores", "total"}
    session = ort.InferenceSession(str(outcome.model_path), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(5).normal(size=(5, FEATURES)).astype(np.float32)
    values = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"x": rows}), strict=True)
    )
    assert values["scores"].shape == (5, 2)
    np.testing.assert_allclose(values["total"], values["scores"].sum(axis=1), rtol=1e-5)
