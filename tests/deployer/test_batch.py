"""Batch jobs in the engine: every input format, the mapping check, row errors, resume.

Real onnxruntime in this process, and a real serving instance (the local runtime)
for the V2 REST path; a real SIGKILL of a process in the middle of a job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployer.batch import (
    OUTPUT_SUFFIX,
    BatchFailed,
    BatchRequest,
    ChunkProbe,
    InputFormat,
    InstanceRequest,
    MappingError,
    OnnxScorer,
    ScoringError,
    V2Scorer,
    plan_batch,
    probe_chunk_rows,
    run_batch,
    serving_instance,
)
from deployer.runtimes.local import LocalProcessRuntime
from tests.conftest import wait_for
from tests.onnx_models import linear_model

ROWS = 2500
CSV_MAPPING = {"input": ["f0", "f1", "f2", "f3"]}


def lookup_model(path: Path, entries: int = 10) -> None:
    """output = table[idx]: onnxruntime refuses an index past the table (a per-row refusal)."""
    table = numpy_helper.from_array(
        np.arange(entries * 2, dtype=np.float32).reshape(entries, 2), "T"
    )
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "idx"], ["output"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def linear(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    path = tmp_path / "linear.onnx"
    weight, bias = linear_model(path)
    return path, weight, bias


def features(rows: int = ROWS) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((rows, 4)).astype(np.float32)


def write_input(fmt: InputFormat, folder: Path, x: np.ndarray) -> Path:
    """The same rows in each format, with an ``id`` column where the format has columns."""
    ids = np.arange(x.shape[0])
    path = folder / f"in.{fmt}"
    if fmt is InputFormat.CSV:
        table = pa.table({"id": ids, **{f"f{i}": x[:, i] for i in range(4)}})
        pcsv.write_csv(table, path)
    elif fmt is InputFormat.PARQUET:
        flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
        pq.write_table(pa.table({"id": ids, "input": flat}), path, row_group_size=700)
    elif fmt is InputFormat.JSONL:
        with path.open("w") as handle:
            for i, row in enumerate(x):
                handle.write(json.dumps({"id": i, "input": row.tolist()}) + "\n")
    elif fmt is InputFormat.NPY:
        np.save(path, x)
    else:
        np.savez(path, input=x, id=ids)
    return path


def predictions(fmt: InputFormat, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids or row numbers, predictions) read back from a job's output."""
    if fmt is InputFormat.CSV:
        table = pcsv.read_csv(out)
        cols = [table.column(f"output_{i}").to_numpy() for i in range(3)]
        return table.column("id").to_numpy(), np.stack(cols, axis=1)
    if fmt is InputFormat.PARQUET:
        table = pq.read_table(out)
        return table.column("id").to_numpy(), np.array(table.column("output").to_pylist())
    if fmt is InputFormat.JSONL:
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        return np.array([r["id"] for r in lines]), np.array([r["output"] for r in lines])
    loaded = np.load(out)
    ids = loaded["id"] if "id" in loaded.files else np.arange(loaded["output"].shape[0])
    return ids, loaded["output"]


@pytest.mark.parametrize("fmt", list(InputFormat))
def test_each_format_gets_its_predictions_appended(
    fmt: InputFormat, linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, weight, bias = linear
    x = features()
    source = write_input(fmt, tmp_path, x)
    out = tmp_path / f"out{OUTPUT_SUFFIX[fmt]}"
    mapping = CSV_MAPPING if fmt is InputFormat.CSV else None
    result = run_batch(
        BatchRequest(source, fmt, tmp_path / "work", out, chunk_rows=600, mapping=mapping),
        OnnxScorer(model),
    )
    assert (result.rows, result.errors) == (ROWS, 0)
    ids, predicted = predictions(fmt, out)
    np.testing.assert_array_equal(ids, np.arange(ROWS))
    np.testing.assert_allclose(predicted, x @ weight + bias, rtol=1e-5, atol=1e-5)
    assert len(result.input_sha256) == len(result.output_sha256) == 64


def test_a_bad_cell_is_that_rows_error_and_the_job_goes_on(
    linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, _, _ = linear
    source = tmp_path / "in.csv"
    lines = ["a,b,c,d"] + [f"{i},1,2,3" for i in range(50)]
    lines[8] = "7,1,two,3"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.csv"
    result = run_batch(
        BatchRequest(source, InputFormat.CSV, tmp_path / "w", out, chunk_rows=16),
        OnnxScorer(model),
    )
    assert (result.rows, result.errors) == (50, 1)
    assert result.first_errors == [{"row": 7, "error": "column 'c': 'two' is not a FP32 value"}]
    table = pcsv.read_csv(out)
    errors = table.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [7]
    assert table.column("output_0").null_count == 1


def test_rows_the_model_refuses_are_found_one_by_one(tmp_path: Path) -> None:
    model = tmp_path / "lookup.onnx"
    lookup_model(model)
    idx = np.arange(1000) % 10
    idx[[3, 500, 999]] = 42  # past the table: onnxruntime refuses the whole request
    source = tmp_path / "in.npz"
    np.savez(source, idx=idx.astype(np.int64))
    result = run_batch(
        BatchRequest(source, InputFormat.NPZ, tmp_path / "w", tmp_path / "o.npz", chunk_rows=256),
        OnnxScorer(model),
    )
    assert result.errors == 3
    assert [e["row"] for e in result.first_errors] == [3, 500, 999]
    assert "refused" in result.first_errors[0]["error"]
    out = np.load(tmp_path / "o.npz")
    good = idx != 42
    np.testing.assert_array_equal(out["output"][good][:, 0], idx[good] * 2.0)
    assert np.isnan(out["output"][~good]).all()


def test_past_the_error_threshold_the_job_fails_with_the_first_errors(tmp_path: Path) -> None:
    model = tmp_path / "lookup.onnx"
    lookup_model(model)
    idx = np.full(300, 99, dtype=np.int64)
    source = tmp_path / "in.npy"
    np.save(source, idx)
    with pytest.raises(BatchFailed) as failed:
        run_batch(
            BatchRequest(
                source,
                InputFormat.NPY,
                tmp_path / "w",
                tmp_path / "o.npz",
                chunk_rows=4,
                max_errors=5,
            ),
            OnnxScorer(model),
        )
    assert "more than the 5" in failed.value.message
    assert [e["row"] for e in failed.value.first_errors] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(
    ("content", "mapping", "column", "input_name", "words"),
    [
        ("x,y,z\n1,2,3\n", None, "", "input", "no column named 'input'"),
        ("a,b,c,d\n1,2,3,4\n", {"input": ["a", "b", "c", "e"]}, "e", "input", "not in the file"),
        ("a,b,c\n1,2,3\n", {"input": ["a", "b", "c"]}, "a", "input", "takes 4 values per row"),
        ("a,b,c,d\nx,y,z,w\n", None, "a", "input", "None of the first 1 rows"),
        ("a,b,c,d\n1,2,3,4\n", {"features": "a"}, "", "features", "does not have"),
    ],
)
def test_a_mismatch_is_refused_before_the_job_naming_column_and_input(
    content: str,
    mapping: dict[str, list[str]] | None,
    column: str,
    input_name: str,
    words: str,
    linear: tuple[Path, np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    model, _, _ = linear
    source = tmp_path / "in.csv"
    source.write_text(content)
    with pytest.raises(MappingError) as refused:
        plan_batch(OnnxScorer(model).signature, source, InputFormat.CSV, mapping)
    assert words in refused.value.message
    assert (refused.value.column, refused.value.input_name) == (column, input_name)
    if column:
        assert f"'{column}'" in refused.value.message
    assert f"'{input_name}'" in refused.value.message


def test_a_parquet_list_of_the_wrong_width_is_refused(
    linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, _, _ = linear
    source = tmp_path / "in.parquet"
    flat = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(9, dtype=np.float32)), 3)
    pq.write_table(pa.table({"input": flat}), source)
    with pytest.raises(MappingError, match=r"Column 'input' holds values of shape \[3\]"):
        plan_batch(OnnxScorer(model).signature, source, InputFormat.PARQUET)


def test_scoring_through_a_serving_instance_matches_onnxruntime(
    linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, weight, bias = linear
    x = features()
    source = write_input(InputFormat.PARQUET, tmp_path, x)
    runtime = LocalProcessRuntime(tmp_path / "runtime")
    request = InstanceRequest(
        job_id=5, model_name="lin", model_version="1", model_path=model, image="",
        work_dir=tmp_path / "job",
    )  # fmt: skip
    signature = OnnxScorer(model).signature
    with serving_instance(runtime, request) as (launch, headers):
        assert [i.revision_id for i in runtime.owned()] == [5]
        unauthorized = V2Scorer(launch.url, "lin", signature)
        with pytest.raises(ScoringError, match=r"401|Authorization"):
            unauthorized.infer({"input": x[:2]})
        scorer = V2Scorer(launch.url, "lin", signature, headers=headers)
        out = tmp_path / "out.parquet"
        result = run_batch(
            BatchRequest(source, InputFormat.PARQUET, tmp_path / "w", out, chunk_rows=512), scorer
        )
    assert runtime.owned() == []
    assert result.rows == ROWS
    ids, predicted = predictions(InputFormat.PARQUET, out)
    np.testing.assert_array_equal(ids, np.arange(ROWS))
    np.testing.assert_allclose(predicted, x @ weight + bias, rtol=1e-5, atol=1e-5)


RUNNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from deployer.batch import BatchRequest, InputFormat, OnnxScorer, run_batch
    source, work, out, model = map(Path, sys.argv[1:5])
    def slow(progress):
        time.sleep(0.15)
    mapping = {"input": ["f0", "f1", "f2", "f3"]}
    run_batch(BatchRequest(source, InputFormat.CSV, work, out, chunk_rows=100, mapping=mapping),
              OnnxScorer(model), on_progress=slow)
    """
)


def test_a_job_killed_mid_way_resumes_with_no_row_missing_or_repeated(
    linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, weight, bias = linear
    x = features(3000)
    source = write_input(InputFormat.CSV, tmp_path, x)
    work, out = tmp_path / "work", tmp_path / "out.csv"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(source), str(work), str(out), str(model)], env=env
    )
    checkpoint = work / "checkpoint.json"

    def chunks_done() -> int:
        try:
            return int(json.loads(checkpoint.read_text())["chunks_done"])
        except (OSError, ValueError, KeyError):
            return 0

    wait_for(lambda: chunks_done() >= 5, timeout_s=60, what="five chunks checkpointed")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    done = chunks_done()
    assert 5 <= done < 30, "the kill must land in the middle of the job"
    time.sleep(0.1)
    result = run_batch(
        BatchRequest(source, InputFormat.CSV, work, out, chunk_rows=100, mapping=CSV_MAPPING),
        OnnxScorer(model),
    )
    assert result.resumed_at_chunk == done
    assert result.rows == 3000
    ids, predicted = predictions(InputFormat.CSV, out)
    np.testing.assert_array_equal(ids, np.arange(3000))
    np.testing.assert_allclose(predicted, x @ weight + bias, rtol=1e-5, atol=1e-5)


class _Costed:
    """onnxruntime, plus a cost per request and per row (what a transport adds)."""

    def __init__(self, inner: OnnxScorer, per_request_s: float, per_row_s: float) -> None:
        self.inner, self.signature, self.max_rows = inner, inner.signature, inner.max_rows
        self.per_request_s, self.per_row_s = per_request_s, per_row_s
        self.sizes: list[int] = []

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(feeds.values())).shape[0]
        self.sizes.append(rows)
        time.sleep(self.per_request_s + self.per_row_s * rows**2)
        return self.inner.infer(feeds)

    def close(self) -> None:
        return None


def test_the_chunk_size_tried_fastest_on_the_first_rows_wins(
    linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    model, _, _ = linear
    source = write_input(InputFormat.CSV, tmp_path, features(5000))
    request = BatchRequest(source, InputFormat.CSV, tmp_path / "w", tmp_path / "o.csv",
                           mapping=CSV_MAPPING)  # fmt: skip
    sizes = (100, 500, 2000)
    # A fixed cost per request: the largest chunk that fits twice in the rows wins.
    fixed = _Costed(OnnxScorer(model), per_request_s=0.004, per_row_s=0)
    probe = probe_chunk_rows(request, fixed, sizes, min_timed_rows=0, max_share=1.0)
    assert probe.chosen == 2000
    assert list(probe.rows_per_s) == [100, 500, 2000]
    assert probe.rows_per_s[2000] > probe.rows_per_s[100]
    assert set(fixed.sizes) == {100, 500, 2000}  # each size really went to the scorer
    assert "2,000 rows per chunk, the fastest tried (100: " in probe.describe()
    # A cost that grows faster than the rows (a transport that chokes on big bodies).
    growing = _Costed(OnnxScorer(model), per_request_s=0.0005, per_row_s=2e-8)
    assert probe_chunk_rows(request, growing, sizes, min_timed_rows=0, max_share=1.0).chosen == 100
    # The probe's rows stay a small share of the file: here none is tried, the default runs.
    assert probe_chunk_rows(request, fixed, sizes) == ChunkProbe(chosen=4096, rows_per_s={})
    # Nothing is written: the job scores these rows itself.
    assert not (tmp_path / "w").exists()
    assert not (tmp_path / "o.csv").exists()


def test_the_probe_keeps_a_chunk_within_one_request_and_a_small_file_in_one_chunk(
    linear: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from deployer.batch.scorer import MAX_REQUEST_BYTES

    wide = tmp_path / "wide.onnx"
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 65536])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(wide))
    rows = np.ones((300, 65536), dtype=np.float32)  # 256 KiB a row
    np.save(tmp_path / "wide.npy", rows)
    request = BatchRequest(tmp_path / "wide.npy", InputFormat.NPY, tmp_path / "w", tmp_path / "o")
    scorer = _Costed(OnnxScorer(wide), per_request_s=0, per_row_s=0)
    probe = probe_chunk_rows(request, scorer, (16, 64, 1024), min_timed_rows=0, max_share=1.0)
    assert MAX_REQUEST_BYTES // (65536 * 4) == 64
    assert probe.chosen in (16, 64)  # 1,024 rows would be 256 MiB a chunk
    assert max(scorer.sizes) <= 64
    small = write_input(InputFormat.CSV, tmp_path, features(150))
    tiny = BatchRequest(small, InputFormat.CSV, tmp_path / "w2", tmp_path / "o2.csv",
                        mapping=CSV_MAPPING)  # fmt: skip
    probe = probe_chunk_rows(tiny, OnnxScorer(linear[0]), (100, 500))
    assert probe == ChunkProbe(chosen=150, rows_per_s={})
