"""Gradient-boosted trees (XGBoost, LightGBM, CatBoost): detected by content, converted
only in the trees converter container, each with the check against the framework itself."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.convert.formats import TREE_FORMATS, Format, UnsupportedFormat, detect, resolve
from deployer.convert.runner import ConversionRefused, choose_sandbox
from deployer.errors import InvalidModel
from deployer.sandbox import Limits
from tests.deployer.convert.test_convert_container import convert_in_container
from tests.deployer.convert.tree_models import FEATURES, MODELS, UNFAITHFUL


def test_tree_model_headers_are_recognised_without_loading(tmp_path: Path) -> None:
    cases = {
        b'{"learner":{"attributes":{}},"version":[3,2,0]}': Format.XGBOOST,
        b"{L\x00\x00\x00\x00\x00\x00\x00\x07learner{": Format.XGBOOST,
        b"{i\x07learner{": Format.XGBOOST,
        b"tree\nversion=v4\nnum_class=1\n": Format.LIGHTGBM,
        b"CBM1\x10\x00\x00\x00": Format.CATBOOST,
    }
    for number, (content, fmt) in enumerate(cases.items()):
        path = tmp_path / f"upload{number}"
        path.write_bytes(content)
        assert detect(path).format == fmt, content
    (tmp_path / "old.bin").write_bytes(b"binf" + bytes(60))
    with pytest.raises(UnsupportedFormat, match="old binary format"):
        detect(tmp_path / "old.bin")


def test_tree_formats_are_refused_without_a_container_even_when_trusted() -> None:
    for fmt in TREE_FORMATS:
        for trusted in (False, True):
            with pytest.raises(ConversionRefused) as refused:
                choose_sandbox(fmt, container=None, limits=Limits(), trusted_local=trusted)
            message = refused.value.message
            assert "no Docker engine answers" in message
            assert "'trees' converter image" in message
            assert "upload the .onnx" in message


def test_tree_files_from_the_frameworks_are_detected_by_content(
    tree_models: dict[str, Path], tmp_path: Path
) -> None:
    for name, (fmt, _kind) in MODELS.items():
        # No telling extension: the content decides.
        anonymous = tmp_path / f"{name}.bin"
        shutil.copyfile(tree_models[name], anonymous)
        assert resolve(anonymous).format == Format(fmt), name
    wrong = "lightgbm" if MODELS["xgb_reg.json"][0] != "lightgbm" else "catboost"
    with pytest.raises(InvalidModel) as mismatch:
        resolve(tree_models["xgb_reg.json"], stated=wrong)
    assert mismatch.value.code == "format_mismatch"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tree_model_converts_in_the_container_with_the_check(
    docker_engine: Any, trees_image: str, tree_models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    import onnxruntime as ort

    fmt, kind = MODELS[name]
    # The binary classifiers are checked on the uploaded sample, the rest on generated rows.
    sample = tree_models["sample.npy"] if "binary" in name else None
    outcome = convert_in_container(
        docker_engine, trees_image, tmp_path, tree_models[name], sample=sample
    )
    report = outcome.report
    assert report.source_format == fmt
    assert report.sandbox == "container"
    assert report.passed, report.check
    assert fmt in report.versions
    check = report.check
    assert check is not None
    assert check.inputs_source == ("uploaded" if sample else "generated")
    assert check.rows == (5 if sample else 16)
    outputs = {o.name: o for o in check.outputs}
    if kind == "classifier":
        assert set(outputs) == {"label", "probabilities"}
        assert outputs["label"].kind == "exact"
        assert outputs["label"].agreement == 1.0
        assert outputs["probabilities"].kind == "float"
        assert outputs["probabilities"].max_abs_diff is not None
        assert outputs["probabilities"].max_abs_diff < 1e-4
    else:
        assert set(outputs) == {"variable"}
        assert outputs["variable"].max_abs_diff is not None
        assert outputs["variable"].max_abs_diff < 1e-3

    # The served model runs in this host's onnxruntime, for any batch size.
    session = ort.InferenceSession(str(outcome.model_path), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(1).normal(size=(7, FEATURES)).astype(np.float32)
    values = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {session.get_inputs()[0].name: rows}),
            strict=True,
        )
    )
    if kind == "classifier":
        classes = 2 if "binary" in name else 3
        assert values["probabilities"].shape == (7, classes)
        np.testing.assert_allclose(values["probabilities"].sum(axis=1), 1.0, atol=1e-5)
        assert values["label"].shape == (7,)
        np.testing.assert_array_equal(values["label"], values["probabilities"].argmax(axis=1))
    else:
        assert values["variable"].shape in ((7, 1), (7,))


def test_an_unfaithful_tree_conversion_is_blocked_by_the_check(
    docker_engine: Any, trees_image: str, tree_models: dict[str, Path], tmp_path: Path
) -> None:
    outcome = convert_in_container(docker_engine, trees_image, tmp_path, tree_models[UNFAITHFUL])
    report = outcome.report
    assert report.passed is False
    assert report.check is not None
    failed = report.check.failures()
    assert [o.name for o in failed] == ["variable"]
    assert (failed[0].mismatched or 0) > 0
