"""Real conversions with the real converters in the limited child, proved and then served.

Every test here runs the conversion job the way the portal does without Docker:
``deployer.convert.job`` in a child process under memory and time limits (for
pickle and PyTorch files with trusted local conversion on). The container path
runs the same job and is tested in test_convert_container.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from deployer.checks import check_known_answer, v2_request, wait_until_ready
from deployer.convert.archive import extract_onnx_archive
from deployer.convert.formats import Format, resolve
from deployer.convert.onnx_tools import newest_runtime_opset
from deployer.convert.report import ConversionOptions, ConversionReport
from deployer.convert.runner import (
    ChildSandbox,
    ConversionOutcome,
    ConversionRefused,
    ConversionRequest,
    StepEvent,
    choose_sandbox,
    convert_model,
)
from deployer.errors import DeployerError
from deployer.runtimes.base import InstanceState, LaunchSpec
from deployer.runtimes.local import LocalProcessRuntime
from deployer.sandbox import Limits
from deployer.validate import ValidationRequest, validate_onnx
from tests.conftest import REPO, require_module
from tests.deployer.convert import conversion_models as cm

LIMITS = Limits(memory_mb=4096, timeout_s=300)


def convert(
    tmp_path: Path,
    source: Path,
    *,
    sample: Path | None = None,
    options: ConversionOptions | None = None,
    limits: Limits = LIMITS,
    trusted: bool = True,
    known_answer: Path | None = None,
    fmt: Format | None = None,
    steps: list[StepEvent] | None = None,
) -> ConversionOutcome:
    detection = resolve(source)
    request = ConversionRequest(
        source=source,
        format=fmt or detection.format or Format.ONNX,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        options=options or ConversionOptions(),
        sample_path=sample,
        known_answer=known_answer,
        detected=detection.evidence,
        serving_opset=newest_runtime_opset(),
        limits=limits,
    )
    sandbox = ChildSandbox(limits, trusted=trusted)
    return convert_model(request, sandbox, on_step=(steps.append if steps is not None else print))


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalProcessRuntime]:
    runtime = LocalProcessRuntime(tmp_path / "runtime")
    yield runtime
    for instance in runtime.owned():
        runtime.stop(instance.handle, grace_s=1)


def serve(
    runtime: LocalProcessRuntime, model: Path, inputs: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Start the real serving runtime on ``model`` and send one V2 request."""
    launch = runtime.start(
        LaunchSpec(
            deployment_id=1, revision_id=1, model_name="demo", model_version="1", model_path=model
        )
    )
    wait_until_ready(
        launch.url,
        "demo",
        timeout_s=60,
        still_running=lambda: runtime.status(launch.handle).state == InstanceState.RUNNING,
        describe_failure=lambda: runtime.logs(launch.handle),
    )
    response = requests.post(
        f"{launch.url}/v2/models/demo/infer", json=v2_request(inputs), timeout=30
    )
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def _no_scratch_left(tmp_path: Path) -> bool:
    scratch = tmp_path / "work" / "scratch"
    return not scratch.exists() or not any(scratch.iterdir())


# ---------------------------------------------------------------- PyTorch


def test_torchscript_with_two_inputs_and_outputs_converts_checks_and_serves(
    tmp_path: Path, runtime: LocalProcessRuntime
) -> None:
    require_module("torch")
    module = cm.torchscript_file(tmp_path / "model.pt")
    sample = _npz(tmp_path / "sample.npz", cm.torch_sample(rows=4))
    steps: list[StepEvent] = []
    outcome = convert(tmp_path, tmp_path / "model.pt", sample=sample, steps=steps)
    report = outcome.report
    assert report.passed
    assert [s.step for s in steps] == ["load", "convert", "check", "optimize"]
    assert report.converter.startswith("torch.onnx.export (TorchScript")
    assert report.versions["torch"].startswith("2.13.0")
    assert report.signature["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, cm.FEATURES]},
        {"name": "extra", "datatype": "FP32", "shape": [-1, cm.EXTRA]},
    ]
    assert [o["name"] for o in report.signature["outputs"]] == ["output_0", "output_1"]
    assert report.check is not None
    scores, labels = report.check.outputs
    assert scores.kind == "float"
    assert scores.max_abs_diff is not None
    assert scores.max_abs_diff < 1e-4
    assert labels.kind == "exact"
    assert labels.agreement == 1.0
    assert report.check.reference_ms is not None
    assert report.check.candidate_ms is not None
    assert report.optimization is not None
    assert report.optimization.used
    assert report.opset == min(newest_runtime_opset(), 20)
    assert _no_scratch_left(tmp_path)

    inputs = cm.torch_sample(rows=7, seed=9)  # another batch size than the sample's
    served = serve(runtime, outcome.model_path, inputs)
    want_scores, want_labels = cm.torch_answers(module, inputs)
    np.testing.assert_allclose(served["output_0"], want_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(served["output_1"], want_labels)


def test_pt2_program_converts_with_a_dynamic_batch_from_generated_inputs(
    tmp_path: Path, runtime: LocalProcessRuntime
) -> None:
    require_module("onnxscript")
    module = cm.pt2_file(tmp_path / "model.pt2")
    outcome = convert(tmp_path, tmp_path / "model.pt2")
    report = outcome.report
    assert report.passed, report.check
    assert report.check is not None
    assert report.check.inputs_source == "generated"
    assert report.check.rows == 16
    assert report.converter.endswith("dynamo=True)")
    assert report.dynamic_batch
    assert report.opset == min(newest_runtime_opset(), 23)
    inputs = cm.torch_sample(rows=3, seed=4)
    served = serve(runtime, outcome.model_path, inputs)
    want_scores, want_labels = cm.torch_answers(module, inputs)
    np.testing.assert_allclose(served["output_0"], want_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(served["output_1"], want_labels)


def test_pt2_with_a_fixed_batch_keeps_it_and_says_how_to_free_it(tmp_path: Path) -> None:
    require_module("onnxscript")
    cm.pt2_file(tmp_path / "fixed.pt2", dynamic=False)
    report = convert(tmp_path, tmp_path / "fixed.pt2").report
    assert report.passed
    assert not report.dynamic_batch
    assert any("fixed batch size" in note and "dynamic_shapes" in note for note in report.notes)


def test_chosen_opset_is_used_and_an_impossible_one_is_refused(tmp_path: Path) -> None:
    require_module("torch")
    cm.torchscript_file(tmp_path / "model.pt")
    sample = _npz(tmp_path / "sample.npz", cm.torch_sample())
    report = convert(
        tmp_path / "a", tmp_path / "model.pt", sample=sample, options=ConversionOptions(opset=17)
    ).report
    assert report.opset == 17
    assert report.opset_source == "chosen by the uploader"
    with pytest.raises(DeployerError, match="supports opsets up to 20") as error:
        convert(
            tmp_path / "b",
            tmp_path / "model.pt",
            sample=sample,
            options=ConversionOptions(opset=min(newest_runtime_opset(), 23)),
        )
    assert error.value.code == "opset_unsupported"


def test_torchscript_without_a_sample_asks_for_one_naming_the_inputs(tmp_path: Path) -> None:
    require_module("torch")
    cm.torchscript_file(tmp_path / "model.pt")
    with pytest.raises(DeployerError, match=r"sample input.*\(features, extra\)") as error:
        convert(tmp_path, tmp_path / "model.pt")
    assert error.value.code == "sample_required"


def test_dynamic_int8_quantization_has_its_own_check_and_latency(tmp_path: Path) -> None:
    require_module("torch")
    cm.torchscript_file(tmp_path / "model.pt")
    sample = _npz(tmp_path / "sample.npz", cm.torch_sample(rows=8))
    report = convert(
        tmp_path,
        tmp_path / "model.pt",
        sample=sample,
        options=ConversionOptions(quantize="dynamic_int8"),
    ).report
    quantized = report.quantization
    assert quantized is not None
    assert quantized.check is not None
    assert quantized.latency_ms is not None
    assert quantized.baseline_latency_ms is not None
    assert {o.name for o in quantized.check.outputs} == {"output_0", "output_1"}
    assert report.served_file == ("model.int8.onnx" if quantized.used else "model.optimized.onnx")


def test_a_model_that_converts_but_computes_something_else_fails_its_check(
    tmp_path: Path,
) -> None:
    require_module("torch")
    cm.noisy_torchscript_file(tmp_path / "noisy.pt")
    sample = _npz(tmp_path / "x.npy.npz", {"x": np.zeros((4, 3), dtype=np.float32)})
    report = convert(tmp_path / "a", tmp_path / "noisy.pt", sample=sample).report
    assert not report.passed
    assert report.check is not None
    assert not report.check.passed
    [failure] = report.check.failures()
    assert failure.mismatched > 0
    assert failure.max_abs_diff is not None
    # Without an override nothing else is done: the version will fail with this report.
    assert report.optimization is None
    overridden = convert(
        tmp_path / "b",
        tmp_path / "noisy.pt",
        sample=sample,
        options=ConversionOptions(override_reason="noise is the point of this model"),
    ).report
    assert not overridden.passed
    assert overridden.override_reason == "noise is the point of this model"
    assert overridden.optimization is not None
    assert not overridden.optimization.used


def test_unsupported_pytorch_operator_is_named(tmp_path: Path) -> None:
    require_module("torch")
    cm.unsupported_torchscript_file(tmp_path / "fft.pt")
    sample = _npz(tmp_path / "s.npz", {"x": np.ones((2, 8), dtype=np.float32)})
    with pytest.raises(DeployerError, match=r"could not convert the model.*fft") as error:
        convert(tmp_path, tmp_path / "fft.pt", sample=sample)
    assert error.value.code == "unsupported_operator"
    assert _no_scratch_left(tmp_path)


def test_truncated_torchscript_fails_to_load_with_the_cause(tmp_path: Path) -> None:
    require_module("torch")
    cm.torchscript_file(tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    sample = _npz(tmp_path / "s.npz", cm.torch_sample())
    with pytest.raises(DeployerError, match=r"could not load the TorchScript archive.*again"):
        convert(tmp_path, tmp_path / "cut.pt", sample=sample)


def test_without_torch_pytorch_uploads_say_how_to_enable_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow.parent}:{REPO}")
    (tmp_path / "model.pt").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(DeployerError) as error:
        convert(tmp_path, tmp_path / "model.pt", fmt=Format.TORCHSCRIPT)
    assert error.value.code == "torch_missing"
    # Before, it said pip install 'modelport[torch]': modelport is not on any index.
    assert "'modelport[torch]'" not in error.value.message
    command = re.search(r"extra next to the worker: (.+?) \(a CPU build", error.value.message)
    assert command is not None, error.value.message
    _assert_installs_the_torch_extra(command.group(1))


def _assert_installs_the_torch_extra(command: str) -> None:
    """The command runs this installation's pip on a source tree that has the extra."""
    words = shlex.split(command)
    assert words[1:5] == ["-m", "pip", "install", "-e"], words
    assert Path(words[0]).samefile(sys.executable)
    assert subprocess.run([words[0], "-m", "pip", "--version"], check=False).returncode == 0
    target = words[5]
    assert target.endswith("[torch]")
    project = tomllib.loads((Path(target.removesuffix("[torch]")) / "pyproject.toml").read_text())
    assert project["project"]["name"] == "modelport"
    assert "torch" in project["project"]["optional-dependencies"]


# ---------------------------------------------------------------- scikit-learn


def test_skops_pipeline_with_string_labels_keeps_them_and_serves(
    tmp_path: Path, runtime: LocalProcessRuntime
) -> None:
    pipeline = cm.string_label_pipeline()
    cm.skops_file(tmp_path / "model.skops", pipeline)
    # skops loads without running code from the file: the plain limited child will do.
    outcome = convert(tmp_path, tmp_path / "model.skops", trusted=False)
    report = outcome.report
    assert report.passed
    assert report.sandbox == "child-process"
    assert report.versions["skops"]
    assert report.versions["skl2onnx"]
    outputs = {o["name"]: o for o in report.signature["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES"
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert report.check is not None
    label = next(o for o in report.check.outputs if o.name == "label")
    assert label.agreement == 1.0
    assert label.elements == 16

    x, _, _ = cm.sklearn_data(rows=10, seed=5)
    served = serve(runtime, outcome.model_path, {"input": x})
    assert served["label"].tolist() == pipeline.predict(x).tolist()
    np.testing.assert_allclose(served["probabilities"], pipeline.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["pickle", "joblib"])
def test_pickled_pipeline_with_string_labels_converts(tmp_path: Path, kind: str) -> None:
    pipeline = cm.string_label_pipeline()
    path = tmp_path / f"model.{kind}"
    (cm.pickle_file if kind == "pickle" else cm.joblib_file)(path, pipeline)
    x, _, _ = cm.sklearn_data(rows=6, seed=3)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"rows": x.tolist()}))
    report = convert(tmp_path, path, sample=sample).report
    assert report.passed
    assert report.source_format == kind
    assert report.check is not None
    assert report.check.inputs_source == "uploaded"
    assert report.check.rows == 6


def test_pickled_regressor_converts_checks_and_serves(
    tmp_path: Path, runtime: LocalProcessRuntime
) -> None:
    model = cm.regressor()
    cm.pickle_file(tmp_path / "reg.pkl", model)
    outcome = convert(tmp_path, tmp_path / "reg.pkl")
    assert outcome.report.passed
    [variable] = outcome.report.check.outputs if outcome.report.check else ()
    assert variable.name == "variable"
    assert variable.note.startswith("original shape")
    x, _, _ = cm.sklearn_data(rows=5, seed=8)
    served = serve(runtime, outcome.model_path, {"input": x})
    np.testing.assert_allclose(served["variable"].ravel(), model.predict(x), rtol=1e-4)


def test_unsupported_sklearn_step_is_named(tmp_path: Path) -> None:
    cm.pickle_file(tmp_path / "f.pkl", cm.unsupported_sklearn_pipeline())
    with pytest.raises(DeployerError, match="skl2onnx could not convert") as error:
        convert(tmp_path, tmp_path / "f.pkl")
    assert error.value.code == "unsupported_operator"


def test_truncated_pickle_fails_with_the_cause(tmp_path: Path) -> None:
    cm.pickle_file(tmp_path / "m.pkl", cm.regressor())
    data = (tmp_path / "m.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 3])
    with pytest.raises(
        DeployerError, match=r"pickle could not be loaded.*upload it again"
    ) as error:
        convert(tmp_path, tmp_path / "cut.pkl")
    assert error.value.code == "load_failed"


def test_memory_limit_stops_a_greedy_model(tmp_path: Path) -> None:
    cm.greedy_pickle(tmp_path / "greedy.pkl", gigabytes=16)
    with pytest.raises(DeployerError, match="MODELPORT_CONVERSION_MEMORY_MB") as error:
        convert(tmp_path, tmp_path / "greedy.pkl", limits=Limits(memory_mb=1536, timeout_s=120))
    assert error.value.code == "out_of_memory"
    assert _no_scratch_left(tmp_path)


def test_time_limit_stops_a_slow_model(tmp_path: Path) -> None:
    cm.slow_pickle(tmp_path / "slow.pkl", seconds=600)
    with pytest.raises(DeployerError, match="MODELPORT_CONVERSION_TIMEOUT_S") as error:
        convert(tmp_path, tmp_path / "slow.pkl", limits=Limits(memory_mb=2048, timeout_s=8))
    assert error.value.code == "timeout"
    assert _no_scratch_left(tmp_path)


def test_pickles_are_refused_without_a_container_unless_trusted() -> None:
    limits = Limits()
    for fmt in (Format.PICKLE, Format.JOBLIB, Format.TORCHSCRIPT, Format.TORCH_EXPORT):
        with pytest.raises(ConversionRefused, match="MODELPORT_CONVERSION_TRUSTED_LOCAL"):
            choose_sandbox(fmt, container=None, limits=limits, trusted_local=False)
        assert choose_sandbox(fmt, container=None, limits=limits, trusted_local=True).name == (
            "trusted-local"
        )
    for fmt in (Format.SKOPS, Format.ONNX, Format.ONNX_ARCHIVE):
        sandbox = choose_sandbox(fmt, container=None, limits=limits, trusted_local=False)
        assert sandbox.name == "child-process"


# ---------------------------------------------------------------- ONNX archives


def test_onnx_archive_with_external_data_is_optimized_and_served(
    tmp_path: Path, runtime: LocalProcessRuntime
) -> None:
    folder = cm.onnx_with_external_data(tmp_path / "src")[0].parent
    archive = tmp_path / "model.tar.gz"
    cm.onnx_tar_gz(archive, folder)
    assert resolve(archive).format == Format.ONNX_ARCHIVE
    extracted = extract_onnx_archive(archive, tmp_path / "extracted")
    validation = validate_onnx(
        ValidationRequest(model_path=extracted.model_path, work_dir=tmp_path / "validate")
    )
    outcome = convert(
        tmp_path,
        extracted.model_path,
        fmt=Format.ONNX_ARCHIVE,
        known_answer=validation.known_answer_path,
        trusted=False,
    )
    report = outcome.report
    assert report.converter == "none (ONNX upload)"
    assert report.optimization is not None
    assert report.optimization.used
    assert outcome.known_answer_path is not None
    inputs = {"input": np.ones((2, 64), dtype=np.float32)}
    served = serve(runtime, outcome.model_path, inputs)
    original = serve(runtime, extracted.model_path, inputs)
    np.testing.assert_allclose(served["output"], original["output"], rtol=1e-5)


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    cm.pickle_file(tmp_path / "reg.pkl", cm.regressor())
    outcome = convert(tmp_path, tmp_path / "reg.pkl")
    again = ConversionReport.from_dict(json.loads(json.dumps(outcome.report.to_dict())))
    assert again == outcome.report
    metrics = again.metrics()
    assert metrics["check_passed"] == 1.0
    assert "max_abs_diff.variable" in metrics
    assert again.params()["converter"] == "skl2onnx.to_onnx"


def test_known_answer_check_of_served_model(tmp_path: Path, runtime: LocalProcessRuntime) -> None:
    """The served model's known answer (made by validation) matches what it serves."""
    cm.pickle_file(tmp_path / "reg.pkl", cm.regressor())
    outcome = convert(tmp_path, tmp_path / "reg.pkl")
    validation = validate_onnx(
        ValidationRequest(model_path=outcome.model_path, work_dir=tmp_path / "v")
    )
    launch = runtime.start(
        LaunchSpec(
            deployment_id=1,
            revision_id=1,
            model_name="demo",
            model_version="1",
            model_path=outcome.model_path,
        )
    )
    wait_until_ready(
        launch.url,
        "demo",
        timeout_s=60,
        still_running=lambda: True,
        describe_failure=lambda: runtime.logs(launch.handle),
    )
    check_known_answer(launch.url, "demo", validation.known_answer_path)
