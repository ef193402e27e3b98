"""The engine's one conversion operation, without the portal: events in, result out."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.convert.formats import Detection, Format
from deployer.convert.pipeline import (
    ConversionEvent,
    PipelineRequest,
    convert,
    plan,
)
from deployer.convert.report import ConversionOptions
from deployer.convert.runner import ConversionRefused
from tests.deployer.convert import conversion_models as cm


def _request(tmp_path: Path, upload: Path, **extra: object) -> PipelineRequest:
    storage = tmp_path / "storage"
    storage.mkdir(exist_ok=True)
    return PipelineRequest(
        upload=upload,
        file_name=upload.name,
        storage_dir=storage,
        known_answer_path=storage / "known_answer.npz",
        **extra,  # type: ignore[arg-type]
    )


def test_a_skops_upload_goes_down_once_and_reports_each_step(tmp_path: Path) -> None:
    cm.skops_file(tmp_path / "pipe.skops", cm.string_label_pipeline())
    events: list[ConversionEvent] = []
    result = convert(_request(tmp_path, tmp_path / "pipe.skops"), events.append)

    assert result.format == Format.SKOPS
    assert result.served_path.is_file()
    assert result.conversion is not None
    assert result.conversion.passed
    assert {o["name"] for o in result.signature["outputs"]} == {"label", "probabilities"}
    progress = [e.progress for e in events]
    assert progress == sorted(progress)
    assert progress[0] >= 0
    assert progress[-1] < 1
    done = [e.step for e in events if e.kind == "done"]
    assert done == ["detect", "load", "convert", "check", "optimize", "validate"]
    starts = [e.step for e in events if e.kind == "start"]
    assert starts[:5] == ["detect", "load", "convert", "check", "optimize"]
    assert all(e.message for e in events if e.kind == "done")
    assert (tmp_path / "storage" / "known_answer.npz").is_file()


def test_onnx_steps_are_planned_validate_before_optimize() -> None:
    assert plan(Format.ONNX, ConversionOptions()) == ["detect", "validate", "optimize"]
    assert plan(Format.PICKLE, ConversionOptions(optimize=False)) == [
        "detect", "load", "convert", "check", "validate",
    ]  # fmt: skip


class _HandOver(Exception):
    pass


def test_a_run_handed_on_after_detection_does_not_detect_again(tmp_path: Path) -> None:
    """Before: the worker the upload was handed to detected (and reported) it again."""
    cm.pickle_file(tmp_path / "reg.pkl", cm.regressor())

    def refuse() -> None:
        raise _HandOver

    first: list[ConversionEvent] = []
    with pytest.raises(_HandOver):
        convert(_request(tmp_path, tmp_path / "reg.pkl", container=refuse), first.append)
    (detected,) = [e for e in first if e.kind == "done"]
    assert detected.step == "detect"
    assert detected.data["format"] == "pickle"

    second: list[ConversionEvent] = []
    earlier = Detection(Format(detected.data["format"]), detected.data["evidence"])
    result = convert(
        _request(
            tmp_path,
            tmp_path / "reg.pkl",
            detection=earlier,
            container=lambda: None,
            trusted_local=True,
        ),
        second.append,
    )
    assert result.format == Format.PICKLE
    assert [e for e in second if e.step == "detect"] == []


def test_a_refused_pytorch_upload_is_told_to_export_to_onnx(tmp_path: Path) -> None:
    (tmp_path / "model.pt2").write_bytes(b"not read: refused before loading")
    request = _request(
        tmp_path, tmp_path / "model.pt2", stated_format="torch_export", container=lambda: None
    )
    with pytest.raises(ConversionRefused) as refused:
        convert(request, lambda _e: None)
    assert "torch.onnx.export" in refused.value.message
    assert "skops" not in refused.value.message
