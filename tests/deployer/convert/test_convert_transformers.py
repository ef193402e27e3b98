"""Hugging Face transformers model folders (archived): the class config.json names, from
transformers itself (no remote code), exported in the transformers converter container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.convert.formats import Format, resolve
from deployer.convert.runner import ConversionRefused, choose_sandbox
from deployer.sandbox import Limits
from tests.deployer.convert.hf_models import LABELS, VOCAB
from tests.deployer.convert.test_convert_container import convert_in_container


def test_transformers_folders_are_refused_without_a_container() -> None:
    with pytest.raises(ConversionRefused, match="'transformers' converter image"):
        choose_sandbox(Format.TRANSFORMERS, container=None, limits=Limits(), trusted_local=True)


def test_transformers_folder_converts_with_the_check(
    docker_engine: Any, transformers_image: str, hf_models: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    assert resolve(hf_models["bert.tar.gz"]).format == Format.TRANSFORMERS
    outcome = convert_in_container(
        docker_engine,
        transformers_image,
        tmp_path,
        hf_models["bert.tar.gz"],
        sample=hf_models["tokens.npz"],
    )
    report = outcome.report
    assert report.source_format == "transformers"
    assert report.passed, report.check
    assert report.check is not None
    assert report.check.inputs_source == "uploaded"
    assert "transformers" in report.versions
    assert any("tokenizing is the caller's job" in n for n in report.notes)
    (logits,) = report.check.outputs
    assert logits.name == "logits"
    assert logits.max_abs_diff is not None
    assert logits.max_abs_diff < 1e-4
    # Any batch and sequence length.
    session = ort.InferenceSession(str(outcome.model_path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(4, 11)).astype(np.int64)
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert got.shape == (4, LABELS)
