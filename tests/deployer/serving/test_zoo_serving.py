"""The zoo of real architectures on the real serving runtime, with batching on.

Each model is validated as an upload without a sample would be (the generated sample
picks sizes its free dimensions accept), then served with its recorded sample as the
warm-up (``--warmup-sample``), and hit by concurrent callers whose requests mix
sizes: every answer must match onnxruntime in this process, requests of different
shapes are never merged, and batches are only formed along each tensor's real batch
axis (a GRU's state is batched on axis 1; a model with a scalar input not at all).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deployer.samples import generate_sample, load_known_answer
from deployer.signature import session_signature
from deployer.validate import ValidationRequest, sample_note, validate_onnx
from tests.conftest import require_module
from tests.zoo_models import ZOO, assert_close, build, decoded, reference, v2_request

CALLERS = 8
PER_CALLER = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_module("torch")
    folder = tmp_path_factory.mktemp("zoo")
    return {name: build(name, folder) for name in ZOO}


def _infer(server: Any, body: dict[str, Any]) -> dict[str, Any]:
    status, _, data = server.request("POST", f"/v2/models/{server.name}/infer", json.dumps(body))
    assert status == 200, data[:500]
    return dict(json.loads(data))


@pytest.mark.parametrize("name", ["conv1d", "detector"])
def test_free_dimensions_of_one_are_not_what_these_models_take(
    zoo: dict[str, Any], name: str
) -> None:
    """The old generated input (every free dimension 1) fails on them: the zoo is real."""
    session = ort.InferenceSession(str(zoo[name].path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises several types
        session.run(None, generate_sample(session_signature(session), batch=2, size=1))


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_serves_right_answers_under_concurrency_with_batching(
    zoo: dict[str, Any], name: str, start_server: Any, tmp_path: Path
) -> None:
    model = zoo[name]
    report = validate_onnx(ValidationRequest(model_path=model.path, work_dir=tmp_path / "v"))
    assert report.details["sample_source"] == "generated"
    generated = report.details["generated_sample"]
    assert generated["attempts"][-1]["error"] == ""
    note = sample_note(report.details)
    assert note.startswith("on a generated sample (")
    recorded_inputs, recorded_outputs = load_known_answer(report.known_answer_path)
    assert_close(
        {k: v.astype(np.float64) for k, v in recorded_outputs.items()},
        reference(model, recorded_inputs),
    )

    server = start_server(
        model.path,
        name,
        "--warmup-sample",
        str(report.known_answer_path),
        "--max-batch-size",
        "16",
        "--max-queue-delay-us",
        "3000",
    )
    ready = next(e for e in server.events() if e.get("event") == "ready")
    assert ready["warmup_input"] == "sample"
    assert ready["dynamic_batching"] is model.batchable, ready
    if model.batchable:
        assert ready["batch_axes"] == model.batch_axes
    else:
        assert "scalar" in ready["unbatched_reason"]
        assert any(e.get("event") == "batching_disabled" for e in server.events())

    # The uploader's sample too, and then mixed sizes from concurrent callers.
    assert_close(decoded(_infer(server, v2_request(model.sample))), reference(model, model.sample))
    work = [
        [
            model.make_inputs(
                1 + (caller + i) % 2, model.sizes[(caller + i) % len(model.sizes)], 100 * caller + i
            )
            for i in range(PER_CALLER)
        ]
        for caller in range(CALLERS)
    ]
    barrier = threading.Barrier(CALLERS)

    def run(inputs: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        barrier.wait()
        asked = tuple(n for n in reference(model, inputs[0]) if n not in model.optional_outputs)
        return [
            _infer(server, v2_request(x, asked if model.optional_outputs else ())) for x in inputs
        ]

    with ThreadPoolExecutor(CALLERS) as pool:
        answers = list(pool.map(run, work))
    for inputs, replies in zip(work, answers, strict=True):
        for x, reply in zip(inputs, replies, strict=True):
            want = reference(model, x)
            got = decoded(reply)
            assert set(got) == {n for n in want if n not in model.optional_outputs}
            assert_close(got, want, tuple(got))

    _, _, data = server.request("GET", f"/v2/models/{name}/stats")
    stats = json.loads(data)["model_stats"][0]
    requests = CALLERS * PER_CALLER + 1
    assert stats["inference_stats"]["success"]["count"] >= requests
    if model.batchable:
        # Concurrent requests of equal shapes were merged (along each tensor's batch axis).
        assert stats["execution_count"] < stats["inference_stats"]["success"]["count"]
    else:
        assert {entry["batch_size"] for entry in stats["batch_stats"]} == {1}
